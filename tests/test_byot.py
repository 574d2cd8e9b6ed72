"""BYOT: closed forms and invariances of losses.byot_loss, the byot term and its heads.

Self-KD-Lib's values are checked in tests/test_golden.py.
"""

import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import runs
from skd_jax import export
from skd_jax import losses
from skd_jax import networks
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError

CONTEXT = terms_lib.Context(
    num_classes=5, num_epochs=4, batch_size=6, image_shape=(8, 8, 1), num_stages=3
)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random(key=0, batch=6, classes=5, heads=2, dim=4, scale=3.0):
  keys = jax.random.split(jax.random.key(key), 2 * heads + 2)
  z = scale * jax.random.normal(keys[0], (batch, classes))
  f = jax.random.normal(keys[1], (batch, dim))
  zs = [scale * jax.random.normal(k, (batch, classes)) for k in keys[2 : 2 + heads]]
  fs = [jax.random.normal(k, (batch, dim)) for k in keys[2 + heads :]]
  return z, zs, jax.nn.one_hot(jnp.arange(batch) % classes, classes), f, fs


def _numpy_byot(z, zs, y, f, fs, alpha, t, t2, lam, reduction):
  z, y, f = (np.asarray(a, np.float64) for a in (z, y, f))
  soft = np.exp(_log_softmax(z / t))
  out = 0.0
  for zi, fi in zip(zs, fs):
    zi, fi = np.asarray(zi, np.float64), np.asarray(fi, np.float64)
    ce = -(y * _log_softmax(zi)).sum(-1)
    kd = (soft * (_log_softmax(z / t) - _log_softmax(zi / t))).sum(-1)
    sq = (fi - f) ** 2
    feat = sq.sum(-1) if reduction == 'sum' else sq.mean(-1)
    out = out + (1 - alpha) * ce + alpha * (t * t if t2 else 1.0) * kd + lam * feat
  return out


# --- closed forms ---------------------------------------------------------------------------------


def test_two_classes_one_example():
  """Head logits (0, 0), teacher (log 3, 0) at T = 1: CE = log 2, KL(3/4, 1/4 || 1/2, 1/2)."""
  z = jnp.array([[np.log(3.0), 0.0]])
  head = jnp.zeros((1, 2))
  y = jnp.array([[0.0, 1.0]])
  f, fh = jnp.array([[1.0, 2.0]]), jnp.array([[0.0, 0.0]])
  loss = losses.byot_loss(
      z,
      [head],
      y,
      alpha=0.25,
      temperature=1.0,
      features=f,
      head_features=[fh],
      feature_weight=0.5,
      feature_reduction='sum',
  )
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  np.testing.assert_allclose(loss, [0.75 * np.log(2) + 0.25 * kl + 0.5 * 5.0], rtol=1e-6)
  mean = losses.byot_loss(
      z,
      [head],
      y,
      alpha=0.25,
      temperature=1.0,
      features=f,
      head_features=[fh],
      feature_weight=0.5,
      feature_reduction='mean',
  )
  np.testing.assert_allclose(mean, [0.75 * np.log(2) + 0.25 * kl + 0.5 * 2.5], rtol=1e-6)
  # A head that is the teacher: KL 0 at any T. Head (0, 0) at T = 2: teacher softmax((log 3)/2, 0).
  np.testing.assert_allclose(
      losses.byot_loss(z, [z], y, alpha=1.0, temperature=2.0), [0.0], atol=1e-6
  )
  p = np.array([np.sqrt(3), 1.0]) / (np.sqrt(3) + 1)
  kd = losses.byot_loss(z, [head], y, alpha=1.0, temperature=2.0)
  np.testing.assert_allclose(kd, [4.0 * (p * np.log(2 * p)).sum()], rtol=1e-5)
  no_t2 = losses.byot_loss(z, [head], y, alpha=1.0, temperature=2.0, t2_scaling=False)
  np.testing.assert_allclose(no_t2, kd / 4.0, rtol=1e-6)


@pytest.mark.parametrize(
    'alpha, t, t2, lam, reduction',
    [(0.5, 4.0, True, 0.025, 'mean'), (0.1, 3.0, True, 1e-2, 'sum'), (0.3, 3.0, False, 0.0, 'sum')],
)
def test_matches_the_formula_in_float64(alpha, t, t2, lam, reduction):
  z, zs, y, f, fs = _random(1, heads=3)
  got = losses.byot_loss(
      z,
      zs,
      y,
      alpha=alpha,
      temperature=t,
      t2_scaling=t2,
      features=f,
      head_features=fs,
      feature_weight=lam,
      feature_reduction=reduction,
  )
  want = _numpy_byot(z, zs, y, f, fs, alpha, t, t2, lam, reduction)
  np.testing.assert_allclose(got, want, rtol=2e-5)


# --- invariances and gradients --------------------------------------------------------------------


def test_heads_add_up_and_their_order_does_not_matter():
  z, zs, y, f, fs = _random(2, heads=2)
  kw = dict(alpha=0.4, temperature=3.0, features=f, feature_weight=0.1)
  both = losses.byot_loss(z, zs, y, head_features=fs, **kw)
  swapped = losses.byot_loss(z, zs[::-1], y, head_features=fs[::-1], **kw)
  one = [losses.byot_loss(z, [a], y, head_features=[b], **kw) for a, b in zip(zs, fs)]
  np.testing.assert_allclose(both, one[0] + one[1], rtol=1e-6)
  np.testing.assert_allclose(swapped, both, rtol=1e-6)


def test_permuting_classes_or_examples_permutes_nothing_else():
  z, zs, y, f, fs = _random(3)
  kw = dict(alpha=0.3, temperature=2.0, features=f, head_features=fs, feature_weight=0.2)
  base = losses.byot_loss(z, zs, y, **kw)
  perm = np.array([3, 0, 4, 1, 2])
  permuted = losses.byot_loss(z[:, perm], [a[:, perm] for a in zs], y[:, perm], **kw)
  np.testing.assert_allclose(permuted, base, rtol=1e-6)
  rows = np.array([5, 2, 0, 1, 4, 3])
  kw_rows = dict(kw, features=f[rows], head_features=[b[rows] for b in fs])
  by_rows = losses.byot_loss(z[rows], [a[rows] for a in zs], y[rows], **kw_rows)
  np.testing.assert_allclose(by_rows, base[rows], rtol=1e-6)


def test_no_gradient_reaches_the_deep_teacher_logits_or_features():
  z, zs, y, f, fs = _random(4)

  def total(z_, f_, zs_, fs_):
    return losses.byot_loss(
        z_,
        zs_,
        y,
        alpha=0.5,
        temperature=4.0,
        features=f_,
        head_features=fs_,
        feature_weight=0.3,
    ).sum()

  gz, gf, gzs, gfs = jax.grad(total, argnums=(0, 1, 2, 3))(z, f, zs, fs)
  np.testing.assert_array_equal(gz, 0.0)
  np.testing.assert_array_equal(gf, 0.0)
  assert all(np.abs(g).max() > 0 for g in (*gzs, *gfs))


def test_check_grads():
  z, zs, y, f, fs = _random(5, heads=1)
  fn = lambda a, b: losses.byot_loss(
      z, [a], y, alpha=0.5, temperature=3.0, features=f, head_features=[b], feature_weight=0.1
  )
  jtu.check_grads(fn, (zs[0], fs[0]), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_are_finite_with_finite_gradients(dtype):
  z, zs, y, _, _ = _random(6, scale=50.0)
  fn = lambda a: losses.byot_loss(z.astype(dtype), a, y, alpha=0.5, temperature=4.0).sum()
  loss, grads = jax.value_and_grad(fn)([a.astype(dtype) for a in zs])
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)


def test_jit_matches_eager_and_output_is_per_example():
  z, zs, y, f, fs = _random(7)
  fn = lambda *a: losses.byot_loss(
      *a[:3], alpha=0.5, temperature=4.0, features=a[3], head_features=a[4], feature_weight=0.1
  )
  eager = fn(z, zs, y, f, fs)
  chex.assert_shape(eager, (6,))
  np.testing.assert_allclose(jax.jit(fn)(z, zs, y, f, fs), eager, rtol=1e-6)


def test_zero_weights_leave_the_cross_entropy_baseline_exactly():
  z, zs, y, f, fs = _random(8)
  labels = jnp.arange(6) % 5
  outputs = {
      'byot1': zs[0],
      'byot2': zs[1],
      'byot1/features': fs[0],
      'byot2/features': fs[1],
      'features': f,
  }
  build = lambda **loss: terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)
  baseline = build(cross_entropy=dict(weight=1.0))
  method = build(cross_entropy=dict(weight=1.0), byot=dict(weight=0.0, feature_weight=0.1))

  def loss_and_grad(m):
    fn = lambda z_: m(terms_lib.TermInputs(z_, labels, outputs)).loss.sum()
    return jax.value_and_grad(fn)(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)
  # alpha = 0 and lambda = 0: the heads' plain cross-entropies, the deep classifier untouched.
  ce = losses.byot_loss(z, zs, y, alpha=0.0, temperature=3.0)
  want = sum(-(np.asarray(y) * _log_softmax(a)).sum(-1) for a in zs)
  np.testing.assert_allclose(ce, want, rtol=1e-5)


# --- the term and its heads -----------------------------------------------------------------------


def test_the_term_asks_for_later_stage_heads_on_every_shallow_stage_and_none_is_exported():
  loss = ml_collections.ConfigDict(dict(byot=dict(weight=1.0, feature_weight=0.1)))
  term = terms_lib.build(loss, CONTEXT).terms[0]
  assert (term.alpha, term.temperature, term.t2_scaling, term.feature_reduction) == (
      0.5,
      3.0,
      True,
      'sum',
  )
  assert term.heads() == (
      terms_lib.HeadRequest('byot1', 1, 'later_stages', 5),
      terms_lib.HeadRequest('byot2', 2, 'later_stages', 5),
  )
  spec = export.ModelSpec(
      'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (8, 8, 1), (0.5,), (0.25,)
  )
  nets = networks.Networks(spec, {'byot': term.heads()})
  variables = jax.eval_shape(nets.init, jax.random.key(0))  # shapes only: nothing compiles
  assert {'byot1', 'byot2'} <= set(variables['params'])
  assert not {'byot1', 'byot2'} & set(
      nets.inference(variables['params'], variables['batch_stats'])['params']
  )
  images = jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.uint8)
  logits, outputs, _ = jax.eval_shape(
      nets.apply_student, variables['params'], variables['batch_stats'], images
  )
  for name in ('byot1', 'byot2'):
    assert outputs[name].shape == logits.shape == (3, 5)
    assert outputs[f'{name}/features'].shape == outputs['features'].shape == (3, 16)
  z, zs, _, f, fs = _random(9, batch=3, dim=16)
  inputs = {
      'byot1': zs[0],
      'byot2': zs[1],
      'byot1/features': fs[0],
      'byot2/features': fs[1],
      'features': f,
  }
  out = term(terms_lib.TermInputs(z, jnp.arange(3), inputs))
  chex.assert_shape(out.loss, (3,))
  assert set(out.metrics) == {'byot1/top1', 'byot2/top1'}
  first2 = ml_collections.ConfigDict(dict(byot=dict(weight=1.0, first_stage=2)))
  assert terms_lib.build(first2, CONTEXT).terms[0].heads() == (
      terms_lib.HeadRequest('byot2', 2, 'later_stages', 5),
  )


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(alpha=1.5), r'loss.byot.alpha: expected a number in \[0, 1\]'),
        (dict(temperature=0.0), r'loss.byot.temperature: expected a number'),
        (dict(feature_weight=-1.0), r'loss.byot.feature_weight: expected a number'),
        (dict(feature_reduction='max'), r'loss.byot.feature_reduction: expected one of'),
        (dict(t2_scaling=1), r'loss.byot.t2_scaling: expected True or False'),
        (dict(first_stage=3), r'loss.byot.first_stage: expected an integer in \[1, 2\]'),
        (dict(stage=1), r'loss.byot.stage: unknown setting'),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
  loss = ml_collections.ConfigDict(dict(byot=dict(weight=1.0, **settings)))
  with pytest.raises(ConfigError, match=message):
    terms_lib.build(loss, CONTEXT)


@pytest.mark.slow
def test_byot_trains_its_heads_and_exports_without_them(tmp_path):
  """One epoch of the quick config on one device: the heads' losses and top-1 are measured, the
  loss is finite, and the exported model has only the backbone."""
  config = runs.config('byot', num_epochs=1)
  runs.run(config, tmp_path, devices=1)
  records = runs.records(tmp_path, 'train')
  assert records and all(np.isfinite(r['loss/byot']) and np.isfinite(r['loss']) for r in records)
  assert all('byot1/top1' in r and 'byot2/top1' in r for r in records)
  model = export.load_model(tmp_path)
  assert not any(k.startswith('byot') for k in model.variables['params'])
