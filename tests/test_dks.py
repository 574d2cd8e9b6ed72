"""DKS: closed forms and invariances of losses.dks_loss, the dks term, its branches, and the
reference codes' values (``golden/dks.npz``, written by ``golden/make_dks.py``: Self-KD-Lib's
``DKS`` with ``DistillKL(4)`` and the authors' loop with their ``KL_divergence``, executed)."""

import importlib
import pathlib

import chex
import jax
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
GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'dks.npz'


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _random(key=0, batch=6, classes=5, heads=2, scale=3.0):
  keys = jax.random.split(jax.random.key(key), heads + 1)
  z = scale * jax.random.normal(keys[0], (batch, classes))
  zs = [scale * jax.random.normal(k, (batch, classes)) for k in keys[1:]]
  return z, zs, jax.nn.one_hot(jnp.arange(batch) % classes, classes)


def _numpy_dks(z, zs, y, t, t2, lam, eps=0.0):
  y = np.asarray(y, np.float64)
  every = [np.asarray(a, np.float64) for a in [z, *zs]]
  out = sum(-(y * _log_softmax(a)).sum(-1) for a in every[1:])
  smooth = lambda a: (np.exp(_log_softmax(a / t)) + eps) / (1 + eps * a.shape[-1])
  for a, za in enumerate(every):
    for b, zb in enumerate(every):
      if a != b:
        p, q = smooth(zb), smooth(za)
        out = out + lam * (t * t if t2 else 1.0) * (p * np.log(p / q)).sum(-1)
  return out


# --- closed forms ---------------------------------------------------------------------------------


def test_two_classes_one_example():
  """Final (log 3, 0), branch (0, 0), label 1, T = 1: CE log 2 plus KL both ways."""
  z, head, y = jnp.array([[np.log(3.0), 0.0]]), jnp.zeros((1, 2)), jnp.array([[0.0, 1.0]])
  p, u = np.array([0.75, 0.25]), np.array([0.5, 0.5])
  kl_pu, kl_up = (p * np.log(p / u)).sum(), (u * np.log(u / p)).sum()
  loss = losses.dks_loss(z, [head], y, temperature=1.0, synergy_weight=0.5)
  np.testing.assert_allclose(loss, [np.log(2) + 0.5 * (kl_pu + kl_up)], rtol=1e-6)
  # T = 2 with T^2: teacher softmax((log 3)/2, 0) = (sqrt 3, 1) / (sqrt 3 + 1).
  q = np.array([np.sqrt(3), 1.0]) / (np.sqrt(3) + 1)
  kd = 4.0 * ((q * np.log(2 * q)).sum() + (u * np.log(u / q)).sum())
  loss = losses.dks_loss(z, [head], y, temperature=2.0)
  np.testing.assert_allclose(loss, [np.log(2) + kd], rtol=1e-5)
  no_t2 = losses.dks_loss(z, [head], y, temperature=2.0, t2_scaling=False)
  np.testing.assert_allclose(no_t2, [np.log(2) + kd / 4.0], rtol=1e-5)


@pytest.mark.parametrize(
    't, t2, lam, eps, heads',
    [
        (4.0, True, 1.0, 0.0, 2),
        (1.0, False, 0.3, 0.0, 3),
        (3.0, False, 2.0, 0.0, 1),
        (0.5, True, 1.0, 1e-3, 2),
    ],
)
def test_matches_the_formula_in_float64(t, t2, lam, eps, heads):
  z, zs, y = _random(1, heads=heads)
  kw = dict(temperature=t, t2_scaling=t2, synergy_weight=lam, epsilon=eps)
  got = losses.dks_loss(z, zs, y, **kw)
  np.testing.assert_allclose(got, _numpy_dks(z, zs, y, t, t2, lam, eps), rtol=2e-5)


def test_gradients_are_the_closed_form_every_classifier_learns_from_every_other():
  """d/dz_a = [a > 0](softmax z_a - y) + lam s / T sum_{b != a} (softmax(z_a/T) - softmax(z_b/T)):
  the final classifier too is pulled towards the branches (teachers are stopped)."""
  z, zs, y = _random(2, heads=2)
  t, lam = 3.0, 0.7
  fn = lambda *every: losses.dks_loss(
      every[0], every[1:], y, temperature=t, synergy_weight=lam
  ).sum()
  grads = jax.grad(fn, argnums=(0, 1, 2))(z, *zs)
  every = [np.asarray(a, np.float64) for a in (z, *zs)]
  soft = [np.exp(_log_softmax(a / t)) for a in every]
  for a, grad in enumerate(grads):
    want = lam * t * sum(soft[a] - soft[b] for b in range(3) if b != a)
    if a:
      want = want + np.exp(_log_softmax(every[a])) - np.asarray(y)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


# --- invariances and gradients --------------------------------------------------------------------


def test_branch_order_does_not_matter_and_agreeing_classifiers_leave_only_cross_entropies():
  z, zs, y = _random(3, heads=3)
  kw = dict(temperature=4.0, synergy_weight=0.5)
  np.testing.assert_allclose(
      losses.dks_loss(z, zs[::-1], y, **kw), losses.dks_loss(z, zs, y, **kw), rtol=1e-6
  )
  ce = sum(-(np.asarray(y) * _log_softmax(a)).sum(-1) for a in zs)
  np.testing.assert_allclose(
      losses.dks_loss(z, zs, y, temperature=4.0, synergy_weight=0.0), ce, rtol=1e-5
  )
  same = losses.dks_loss(z, [z, z], y, **kw)
  np.testing.assert_allclose(same, 2 * -(np.asarray(y) * _log_softmax(z)).sum(-1), rtol=1e-5)
  # The synergy is symmetric: swapping the final classifier with a branch changes only which
  # cross-entropy is counted.
  swap = losses.dks_loss(zs[0], [z, zs[1], zs[2]], y, **kw)
  ce_z, ce_0 = (-(np.asarray(y) * _log_softmax(a)).sum(-1) for a in (z, zs[0]))
  np.testing.assert_allclose(swap - ce_z, losses.dks_loss(z, zs, y, **kw) - ce_0, rtol=1e-5)


def test_permuting_classes_or_examples_permutes_nothing_else():
  z, zs, y = _random(4)
  base = losses.dks_loss(z, zs, y, temperature=2.0)
  perm = np.array([3, 0, 4, 1, 2])
  permuted = losses.dks_loss(z[:, perm], [a[:, perm] for a in zs], y[:, perm], temperature=2.0)
  np.testing.assert_allclose(permuted, base, rtol=1e-6)
  rows = np.array([5, 2, 0, 1, 4, 3])
  by_rows = losses.dks_loss(z[rows], [a[rows] for a in zs], y[rows], temperature=2.0)
  np.testing.assert_allclose(by_rows, base[rows], rtol=1e-6)


def test_gradients_are_the_finite_differences_with_the_teachers_held_fixed():
  """``check_grads`` cannot be used on the loss itself (its teachers are stopped, so autodiff is
  not the total derivative by design): compare with central differences of the float64 formula in
  which only the student side of each pair moves."""
  z, zs, y = _random(5, heads=2)
  t, lam = 3.0, 0.5
  teachers = [np.exp(_log_softmax(np.asarray(b, np.float64) / t)) for b in zs]

  def student_part(x):  # everything z_0 is the student of
    log_s = _log_softmax(x / t)
    return sum(lam * t * t * (q * (np.log(q) - log_s)).sum() for q in teachers)

  grad = jax.grad(lambda a: losses.dks_loss(a, zs, y, temperature=t, synergy_weight=lam).sum())(z)
  x0, eps = np.asarray(z, np.float64), 1e-5
  numeric = np.zeros_like(x0)
  for i in np.ndindex(*x0.shape):
    step = np.zeros_like(x0)
    step[i] = eps
    numeric[i] = (student_part(x0 + step) - student_part(x0 - step)) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_are_finite_with_finite_gradients(dtype):
  z, zs, y = _random(6, scale=50.0)
  fn = lambda a, b: losses.dks_loss(a, b, y, temperature=4.0).sum()
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1))(
      z.astype(dtype), [a.astype(dtype) for a in zs]
  )
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in jax.tree.leaves(grads))


def test_jit_matches_eager_and_output_is_per_example():
  z, zs, y = _random(7)
  fn = lambda *a: losses.dks_loss(*a, temperature=4.0)
  eager = fn(z, zs, y)
  chex.assert_shape(eager, (6,))
  np.testing.assert_allclose(jax.jit(fn)(z, zs, y), eager, rtol=1e-6)


def test_bad_inputs_are_value_errors():
  z, zs, y = _random(8)
  with pytest.raises(ValueError, match='at least one'):
    losses.dks_loss(z, [], y)
  with pytest.raises(ValueError, match='must have one shape'):
    losses.dks_loss(z, [zs[0][:, :3]], y)


def test_zero_weight_leaves_the_cross_entropy_baseline_exactly():
  z, zs, _ = _random(9)
  labels = jnp.arange(6) % 5
  outputs = {'dks1': zs[0], 'dks2': zs[1]}
  build = lambda **loss: terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)
  baseline = build(cross_entropy=dict(weight=1.0))
  method = build(cross_entropy=dict(weight=1.0), dks=dict(weight=0.0))

  def loss_and_grad(m):
    fn = lambda z_: m(terms_lib.TermInputs(z_, labels, outputs)).loss.sum()
    return jax.value_and_grad(fn)(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)


# --- the reference codes --------------------------------------------------------------------------


@pytest.mark.parametrize('reference', ['self_kd_lib', 'authors'])
def test_loss_and_gradients_are_the_reference_codes(reference):
  """Self-KD-Lib's ``DKS`` is the shipped config (``cross_entropy`` 1 + ``dks`` 1 at T = 4, T^2);
  the authors' loop is ``temperature=1.0, epsilon=1e-8`` (without the smoothing the loss differs
  by 5e-5 relative here: some students put probabilities below 1e-6 where the teacher does not).
  Self-KD-Lib's ``x1`` is the branch on stage 3 of 4, ``x2`` on stage 2. The batch loss is the
  trainer's mean over the batch."""
  with np.load(GOLDEN) as data:
    g = dict(data)
  loss_config = importlib.import_module('configs.dks').get_config().loss
  assert loss_config.dks.temperature == g['temperature']
  if reference == 'authors':
    loss_config.dks.temperature = 1.0
    loss_config.dks.epsilon = 1e-8
  labels = jnp.asarray(g['labels'])
  method = terms_lib.build(
      loss_config, terms_lib.Context(g['z0'].shape[1], 200, len(labels), num_stages=4)
  )
  assert [r.name for r in method.terms[1].heads()] == ['dks2', 'dks3']

  def batch_loss(z0, z1, z2):
    return jnp.mean(method(terms_lib.TermInputs(z0, labels, {'dks3': z1, 'dks2': z2})).loss)

  names = ('z0', 'z1', 'z2')
  loss, grads = jax.value_and_grad(batch_loss, argnums=(0, 1, 2))(
      *[jnp.asarray(g[k], jnp.float32) for k in names]
  )
  np.testing.assert_allclose(float(loss), g[f'{reference}_loss'], rtol=1e-5)
  for name, grad in zip(names, grads):
    want = g[f'{reference}_g_{name}']
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)


# --- the term and its branches --------------------------------------------------------------------


def test_the_term_asks_for_later_stage_branches_and_none_is_evaluated_or_exported():
  loss = ml_collections.ConfigDict(dict(dks=dict(weight=1.0)))
  term = terms_lib.build(loss, CONTEXT).terms[0]
  assert (term.temperature, term.t2_scaling, term.synergy_weight) == (4.0, True, 1.0)
  assert term.heads() == (
      terms_lib.HeadRequest('dks1', 1, 'later_stages', 5),
      terms_lib.HeadRequest('dks2', 2, 'later_stages', 5),
  )
  spec = export.ModelSpec(
      'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (8, 8, 1), (0.5,), (0.25,)
  )
  nets = networks.Networks(spec, {'dks': term.heads()})
  variables = jax.eval_shape(nets.init, jax.random.key(0))  # shapes only: nothing compiles
  assert {'dks1', 'dks2'} <= set(variables['params'])
  inference = nets.inference(variables['params'], variables['batch_stats'])
  assert not {'dks1', 'dks2'} & set(inference['params'])
  images = jax.ShapeDtypeStruct((3, 8, 8, 1), jnp.uint8)
  logits, outputs, _ = jax.eval_shape(
      nets.apply_student, variables['params'], variables['batch_stats'], images
  )
  assert outputs['dks1'].shape == outputs['dks2'].shape == logits.shape == (3, 5)
  _, eval_outputs = jax.eval_shape(nets.apply_inference, inference, images)
  assert not any(k.startswith('dks') for k in eval_outputs)
  z, zs, _ = _random(10, batch=3)
  out = term(terms_lib.TermInputs(z, jnp.arange(3), {'dks1': zs[0], 'dks2': zs[1]}))
  chex.assert_shape(out.loss, (3,))
  assert set(out.metrics) == {'dks1/top1', 'dks2/top1'}
  first2 = ml_collections.ConfigDict(dict(dks=dict(weight=1.0, first_stage=2)))
  assert terms_lib.build(first2, CONTEXT).terms[0].heads() == (
      terms_lib.HeadRequest('dks2', 2, 'later_stages', 5),
  )


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(temperature=0.0), r'loss.dks.temperature: expected a number'),
        (dict(synergy_weight=-1.0), r'loss.dks.synergy_weight: expected a number'),
        (dict(t2_scaling=1), r'loss.dks.t2_scaling: expected True or False'),
        (dict(first_stage=3), r'loss.dks.first_stage: expected an integer in \[1, 2\]'),
        (dict(alpha=0.5), r'loss.dks.alpha: unknown setting'),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
  loss = ml_collections.ConfigDict(dict(dks=dict(weight=1.0, **settings)))
  with pytest.raises(ConfigError, match=message):
    terms_lib.build(loss, CONTEXT)


@pytest.mark.slow
def test_a_few_steps_train_the_branches_and_the_export_has_only_the_backbone(tmp_path):
  """Five steps of the quick config on one device: the term's loss and the branches' top-1 are
  measured and finite, the checkpoint holds the branches, the exported model does not."""
  config = runs.config('dks', num_epochs=1)
  runs.run(config, tmp_path, devices=1)
  records = runs.records(tmp_path, 'train')
  assert records and all(np.isfinite(r['loss/dks']) and np.isfinite(r['loss']) for r in records)
  assert all('dks1/top1' in r and 'dks2/top1' in r for r in records)
  _, state = runs.restore(tmp_path)
  assert {'dks1', 'dks2'} <= set(state['params'])
  model = export.load_model(tmp_path)
  assert not any(k.startswith('dks') for k in model.variables['params'])
  assert runs.records(tmp_path, 'eval')[-1]['top1'] >= 0.0
