"""DDGSD (METHODS.md §3.13): the loss's closed forms and invariances, the term, the reference
implementations' values (golden/ddgsd.npz, written by golden/make_ddgsd.py), and random views
and the ``'again'`` group in the trainer."""

import importlib
import pathlib

import jax
from jax import test_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import runs
from skd_jax import config_lib
from skd_jax import losses
from skd_jax import preemption
from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax.errors import ConfigError

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'ddgsd.npz'


def _views(key=0, batch=4, classes=5, dim=3, scale=2.0):
  k = jax.random.split(jax.random.key(key), 4)
  z1, z2 = (jax.random.normal(k[i], (batch, classes)) * scale for i in (0, 1))
  f1, f2 = (jnp.abs(jax.random.normal(k[i], (batch, dim))) for i in (2, 3))
  return z1, z2, f1, f2, jnp.arange(batch) % classes


def test_identical_views_give_twice_the_cross_entropy():
  z1, _, f1, _, y = _views()
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(z1, y)
  for mmd in ('vector', 'scalar'):
    got = losses.ddgsd_loss(z1, z1, f1, f1, y, mmd=mmd)
    np.testing.assert_allclose(got, 2 * ce, rtol=1e-5, atol=1e-6)


def test_closed_form_two_classes_one_example():
  """z1 = (0, 0), z2 = (log 3, 0), T = 1: q1 = (1/2, 1/2), q2 = (3/4, 1/4);
  KL(q2 || q1) = 3/4 log 3/2 + 1/4 log 1/2, KL(q1 || q2) = 1/2 log 2/3 + 1/2 log 2."""
  z1, z2, y = jnp.array([[0.0, 0.0]]), jnp.array([[np.log(3.0), 0.0]]), jnp.array([0])
  f = jnp.zeros((1, 2))
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5) + 0.5 * np.log(2 / 3) + 0.5 * np.log(2.0)
  got = losses.ddgsd_loss(z1, z2, f, f, y, temperature=1.0, ce_weight=0.0, kl_weight=1.0)
  np.testing.assert_allclose(got, [kl], rtol=1e-6)
  ce = np.log(2.0) + np.log(4 / 3)
  got = losses.ddgsd_loss(z1, z2, f, f, y, ce_weight=0.5, kl_weight=0.0)
  np.testing.assert_allclose(got, [0.5 * ce], rtol=1e-6)


def test_the_mmd_is_the_batch_value_on_every_example_and_ignores_padding():
  """Every valid example carries the batch's MMD, so their mean is it; padding slots neither
  enter the means nor change anything when their features change."""
  z1, z2, f1, f2, y = _views(batch=6)
  valid = jnp.array([True, True, True, True, False, False])
  only = dict(ce_weight=0.0, kl_weight=0.0, mmd_weight=1.0, valid=valid)
  m1, m2 = f1[:4].mean(0), f2[:4].mean(0)
  vector = losses.ddgsd_loss(z1, z2, f1, f2, y, mmd='vector', **only)
  np.testing.assert_allclose(vector, np.full(6, np.sum((m1 - m2) ** 2)), rtol=1e-6)
  scalar = losses.ddgsd_loss(z1, z2, f1, f2, y, mmd='scalar', **only)
  np.testing.assert_allclose(scalar, np.full(6, (m1.mean() - m2.mean()) ** 2), rtol=1e-5)
  moved = f1.at[4:].add(100.0)
  np.testing.assert_array_equal(losses.ddgsd_loss(z1, z2, moved, f2, y, **only), vector)

  # The gradient of the trainer's mean over valid examples is the batch MMD's.
  def trainer_mean(f):
    loss = losses.ddgsd_loss(z1, z2, f, f2, y, **only)
    return jnp.sum(jnp.where(valid, loss, 0.0)) / jnp.sum(valid)

  grad = jax.grad(trainer_mean)(f1)
  np.testing.assert_allclose(grad[:4], np.broadcast_to(2 * (m1 - m2) / 4, (4, 3)), rtol=1e-5)
  np.testing.assert_array_equal(grad[4:], 0.0)


def test_invariances_symmetry_permutation_and_zero_weights():
  z1, z2, f1, f2, y = _views(batch=5)
  base = losses.ddgsd_loss(z1, z2, f1, f2, y)
  np.testing.assert_allclose(losses.ddgsd_loss(z2, z1, f2, f1, y), base, rtol=1e-6)  # views swap
  perm = jnp.array([3, 0, 4, 1, 2])  # the examples' order does not matter
  got = losses.ddgsd_loss(z1[perm], z2[perm], f1[perm], f2[perm], y[perm])
  np.testing.assert_allclose(got, base[perm], rtol=1e-5)
  ce = optax.losses.softmax_cross_entropy_with_integer_labels
  zero = losses.ddgsd_loss(z1, z2, f1, f2, y, kl_weight=0.0, mmd_weight=0.0)
  np.testing.assert_allclose(zero, ce(z1, y) + ce(z2, y), rtol=1e-6)


def test_targets_carry_no_gradient_and_gradients_check():
  z1, z2, f1, f2, y = _views(batch=3)
  kl_only = lambda a, b: jnp.sum(losses.ddgsd_loss(a, b, f1, f2, y, ce_weight=0.0, mmd_weight=0.0))
  # KL(sg q2 || q1) + KL(sg q1 || q2): the gradient w.r.t. z1 is T (q1 - q2) summed from the
  # first term only (the second's z1 is a stop-gradient target).
  t = 3.0
  want = t * (jax.nn.softmax(z1 / t) - jax.nn.softmax(z2 / t))
  np.testing.assert_allclose(jax.grad(kl_only)(z1, z2), want, rtol=1e-5, atol=1e-6)
  # Finite differences see through stop-gradients: checked without the KL.
  f = lambda a, b, c, d: losses.ddgsd_loss(a, b, c, d, y, kl_weight=0.0, mmd_weight=1.0)
  test_util.check_grads(f, (z1, z2, f1, f2), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_stay_finite_and_jit_agrees(dtype):
  z1, z2, f1, f2, y = _views(scale=50.0)
  args = [a.astype(dtype) for a in (z1, z2, f1, f2)]
  loss, grads = jax.value_and_grad(
      lambda *a: jnp.mean(losses.ddgsd_loss(*a, y)), argnums=(0, 1, 2, 3)
  )(*args)
  assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
  eager = losses.ddgsd_loss(*args, y)
  assert eager.shape == (4,) and eager.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(losses.ddgsd_loss)(*args, y), eager, rtol=1e-6)


def _build(**settings):
  loss = ml_collections.ConfigDict({'ddgsd': dict(weight=1.0, **settings)})
  return terms_lib.build(loss, terms_lib.Context(5, 2, 4))


def test_the_term_asks_for_the_again_group_and_reads_its_pass():
  method = _build(batchnorm='separate')
  (forward,) = method.forwards
  assert (forward.name, forward.group, forward.grad, forward.batchnorm) == (
      'ddgsd',
      'again',
      True,
      'separate',
  )
  assert method.groups == ('again',) and method.num_views == 1
  assert _build().forwards[0].batchnorm == 'joint'
  z1, z2, f1, f2, y = _views()
  again = terms_lib.Pass(z2, y, jnp.ones(4, bool), {'features': f2})
  inputs = terms_lib.TermInputs(z1, y, {'features': f1}, passes={'ddgsd': again})
  out = method(inputs)
  np.testing.assert_allclose(out.loss, losses.ddgsd_loss(z1, z2, f1, f2, y), rtol=1e-6)
  assert set(out.metrics) == {'ddgsd/again_top1'}


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(mmd='rbf'), r'^loss\.ddgsd\.mmd: expected one of'),
        (dict(batchnorm='none'), r'^loss\.ddgsd\.batchnorm: expected one of'),
        (dict(temperature=0.0), r'^loss\.ddgsd\.temperature: expected a number'),
    ],
)
def test_invalid_settings_are_one_line_config_errors(settings, message):
  with pytest.raises(ConfigError, match=message) as error:
    _build(**settings)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('variant', ['yechanp', 'selfkd_lib'])
def test_loss_and_gradients_are_the_reference_implementations(variant):
  """golden/make_ddgsd.py ran yechanp/self_kd's ``DDGSD.calculate_loss`` and Self-KD-Lib's
  ``DDGSD`` + ``DistillKL`` (+ ``main.py``'s ``loss_cls + loss_div``) on one 2B batch; ours:
  configs/ddgsd.py's variant, the mean over the batch of the per-example losses."""
  with np.load(GOLDEN) as data:
    g = {k.removeprefix(f'{variant}_'): data[k] for k in data if k.startswith(f'{variant}_')}
  loss_config = importlib.import_module('configs.ddgsd').get_config(f'variant={variant}').loss
  labels = jnp.asarray(g['labels'])
  batch = len(labels)
  method = terms_lib.build(loss_config, terms_lib.Context(g['logits'].shape[1], 200, batch))

  def batch_loss(logits, features):
    again = terms_lib.Pass(
        logits[batch:], labels, jnp.ones(batch, bool), {'features': features[batch:]}
    )
    inputs = terms_lib.TermInputs(
        logits[:batch], labels, {'features': features[:batch]}, passes={'ddgsd': again}
    )
    return jnp.mean(method(inputs).loss)

  logits, features = jnp.asarray(g['logits']), jnp.asarray(g['features'])
  loss, (grad_z, grad_f) = jax.value_and_grad(batch_loss, argnums=(0, 1))(logits, features)
  np.testing.assert_allclose(float(loss), g['loss'], rtol=1e-5)
  for got, want in ((grad_z, g['grad_logits']), (grad_f, g['grad_features'])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --- in the trainer -------------------------------------------------------------------------------


def _config():
  """DDGSD's two draws of the augmentation, beside a mixup view drawn from its term's key."""
  config = runs.config('ddgsd', num_epochs=1)
  config.loss.mix = dict(module='random_views', weight=0.5)
  return config


@pytest.mark.slow
def test_random_views_and_the_again_group_are_per_seed_and_step_and_resume_bit_identically(
    tmp_path, monkeypatch
):
  run = lambda workdir: runs.run(_config(), tmp_path / workdir, devices=2)
  run('straight')
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 3)  # mid-epoch, mid-window
    with pytest.raises(train.Preempted, match='at step 3'):
      run('resumed')
  run('resumed')
  straight = runs.records(tmp_path / 'straight', 'train')
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 5)
  _, expected = runs.restore(tmp_path / 'straight', 5)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  # The mixing coefficient the loss saw is the one drawn from (seed, step) for the views.
  import random_views  # pylint: disable=import-outside-toplevel

  key = jax.random.key(0)
  method = terms_lib.Combined((random_views.Mix(weight=0.5),))
  lam = lambda step: random_views.draws(
      method.term_key(jax.random.fold_in(jax.random.fold_in(key, 3), step), method.terms[0]), 16
  )[0]
  start = 0
  for record in straight:  # each record: the mean over the steps since the previous one
    window = [float(lam(step)) for step in range(start, record['step'])]
    np.testing.assert_allclose(record['mix/lam'], np.mean(window), rtol=1e-6)
    start = record['step']
    assert np.isfinite(record['loss/ddgsd']) and 0 <= record['ddgsd/again_top1'] <= 100


@pytest.mark.parametrize('arg', [None, 'quick', 'variant=yechanp', 'quick,variant=yechanp'])
def test_the_config_is_valid_and_quick_is_the_baselines_setup_but_the_loss(arg):
  module = importlib.import_module('configs.ddgsd')
  config = module.get_config(arg)
  config_lib.validate(config, device_count=8)
  method = terms_lib.build(config.loss, terms_lib.Context(10, config.num_epochs, 128))
  assert [t.name for t in method.terms] == ['ddgsd'] and method.groups == ('again',)
  if arg and 'quick' in arg:
    baseline = importlib.import_module('configs.baseline').get_config('quick')
    config.loss = baseline.loss
    assert config.to_dict() == baseline.to_dict()
  with pytest.raises(ConfigError, match=r'^--config argument: variant must be one of'):
    module.get_config('variant=youngerous')
