"""Loss functions against closed forms, invariances, gradients and dtypes."""

import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import losses


def _one_hot(labels, c):
  return jax.nn.one_hot(jnp.asarray(labels), c)


def test_soft_target_cross_entropy_closed_form():
  # Two classes, logits (a, 0), target (q, 1-q): H = -q log s(a) - (1-q) log(1 - s(a)).
  a, q = 1.3, 0.7
  s = 1 / (1 + np.exp(-a))
  expected = -q * np.log(s) - (1 - q) * np.log(1 - s)
  got = losses.soft_target_cross_entropy(jnp.array([[a, 0.0]]), jnp.array([[q, 1 - q]]))
  chex.assert_shape(got, (1,))
  np.testing.assert_allclose(got[0], expected, rtol=1e-6)


def test_cross_entropy_of_identical_distributions_is_entropy():
  logits = jax.random.normal(jax.random.key(0), (5, 7))
  p = jax.nn.softmax(logits)
  entropy = -jnp.sum(p * jnp.log(p), -1)
  np.testing.assert_allclose(losses.soft_target_cross_entropy(logits, p), entropy, rtol=1e-5)


def test_label_smoothing_variants():
  y = _one_hot([2], 5)
  np.testing.assert_allclose(
      losses.label_smoothing_targets(y, epsilon=0.1)[0], [0.02, 0.02, 0.92, 0.02, 0.02], rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.label_smoothing_targets(y, epsilon=0.1, variant='non_target')[0],
      [0.025, 0.025, 0.9, 0.025, 0.025],
      rtol=1e-6,
  )
  with pytest.raises(ValueError, match='variant'):
    losses.label_smoothing_targets(y, epsilon=0.1, variant='zipf')


def test_label_smoothing_zero_epsilon_is_cross_entropy():
  logits = jax.random.normal(jax.random.key(1), (4, 6))
  y = _one_hot([0, 1, 5, 3], 6)
  np.testing.assert_array_equal(
      losses.label_smoothing_cross_entropy(logits, y, epsilon=0.0),
      losses.soft_target_cross_entropy(logits, y),
  )


def test_pskd_alpha_schedule():
  alphas = losses.pskd_alpha(jnp.arange(4), alpha_T=0.8, num_epochs=4)
  np.testing.assert_allclose(alphas, [0.2, 0.4, 0.6, 0.8], rtol=1e-6)


def test_pskd_closed_form():
  # Two classes: y = (1, 0), past = (0.3, 0.7), alpha = 0.5 -> target (0.65, 0.35).
  logits = jnp.array([[2.0, -1.0]])
  got = losses.pskd_cross_entropy(logits, _one_hot([0], 2), jnp.array([[0.3, 0.7]]), alpha=0.5)
  log_p = np.log(np.exp([2.0, -1.0]) / np.exp([2.0, -1.0]).sum())
  np.testing.assert_allclose(got[0], -(0.65 * log_p[0] + 0.35 * log_p[1]), rtol=1e-6)


def test_pskd_zero_alpha_is_cross_entropy_and_one_hot_history_is_cross_entropy():
  logits = jax.random.normal(jax.random.key(2), (8, 10))
  y = _one_hot(np.arange(8), 10)
  past = jax.nn.softmax(jax.random.normal(jax.random.key(3), (8, 10)))
  ce = losses.soft_target_cross_entropy(logits, y)
  np.testing.assert_array_equal(losses.pskd_cross_entropy(logits, y, past, alpha=0.0), ce)
  # Epoch 0: the history holds the labels, so any alpha gives cross-entropy.
  np.testing.assert_allclose(losses.pskd_cross_entropy(logits, y, y, alpha=0.8), ce, rtol=1e-6)


def test_pskd_per_example_alpha_and_stopped_history_gradient():
  logits = jax.random.normal(jax.random.key(4), (3, 4))
  y = _one_hot([0, 1, 2], 4)
  past = jax.nn.softmax(jax.random.normal(jax.random.key(5), (3, 4)))
  per_example = losses.pskd_cross_entropy(logits, y, past, alpha=jnp.array([0.0, 0.5, 1.0]))
  for i, a in enumerate([0.0, 0.5, 1.0]):
    np.testing.assert_allclose(
        per_example[i],
        losses.pskd_cross_entropy(logits[i : i + 1], y[i : i + 1], past[i : i + 1], alpha=a)[0],
        rtol=1e-6,
    )
  grad_past = jax.grad(lambda p: losses.pskd_cross_entropy(logits, y, p, alpha=0.5).sum())(past)
  np.testing.assert_array_equal(grad_past, 0.0)


def test_gradient_of_soft_cross_entropy_is_softmax_minus_target():
  logits = jax.random.normal(jax.random.key(6), (2, 5))
  target = jax.nn.softmax(jax.random.normal(jax.random.key(7), (2, 5)))
  grad = jax.grad(lambda z: losses.soft_target_cross_entropy(z, target).sum())(logits)
  np.testing.assert_allclose(grad, jax.nn.softmax(logits) - target, atol=1e-6)
  jtu.check_grads(
      lambda z: losses.soft_target_cross_entropy(z, target), (logits,), order=2, modes=['rev']
  )


LOSSES = {
    'soft_ce': lambda z, y, p: losses.soft_target_cross_entropy(z, y),
    'label_smoothing': lambda z, y, p: losses.label_smoothing_cross_entropy(z, y, epsilon=0.1),
    'pskd': lambda z, y, p: losses.pskd_cross_entropy(z, y, p, alpha=0.8),
}


@pytest.mark.parametrize('name', sorted(LOSSES))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_are_finite_with_finite_gradients(name, dtype):
  fn = LOSSES[name]
  logits = (50.0 * jnp.sign(jax.random.normal(jax.random.key(8), (4, 10)))).astype(dtype)
  y = _one_hot([0, 3, 5, 9], 10)
  past = jax.nn.softmax(logits.astype(jnp.float32) * 3)  # saturated: exact zeros in rows
  value, grad = jax.value_and_grad(lambda z: fn(z, y, past).sum())(logits)
  assert value.dtype == jnp.float32
  assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_jit_matches_eager_and_output_is_per_example(name):
  fn = LOSSES[name]
  logits = jax.random.normal(jax.random.key(9), (6, 5))
  y = _one_hot([0, 1, 2, 3, 4, 0], 5)
  past = jax.nn.softmax(jax.random.normal(jax.random.key(10), (6, 5)))
  eager = fn(logits, y, past)
  chex.assert_shape(eager, (6,))
  np.testing.assert_allclose(jax.jit(fn)(logits, y, past), eager, rtol=1e-6)


def test_integer_logits_are_rejected_naming_the_argument():
  with pytest.raises(
      TypeError, match=r'^logits: expected a floating-point array, got int32\[1, 2\]$'
  ):
    losses.soft_target_cross_entropy(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)))


_ONE_HOT_LOSSES = {
    'label_smoothing': lambda z, y: losses.label_smoothing_cross_entropy(z, y),
    'pskd': lambda z, y: losses.pskd_cross_entropy(z, y, jax.nn.softmax(z), alpha=0.5),
    'drg': lambda z, y: losses.drg_loss(z, z, y),
    'lsskd': lambda z, y: losses.lsskd_loss(z, [z], y),
    'tfkd_reg': lambda z, y: losses.tfkd_reg_loss(z, y),
    'zipf_ls': lambda z, y: losses.zipf_ls_loss(z, y, jax.nn.softmax(z)),
    'byot': lambda z, y: losses.byot_loss(z, [z], y),
    'dks': lambda z, y: losses.dks_loss(z, [z], y),
}


@pytest.mark.parametrize('name', sorted(_ONE_HOT_LOSSES))
def test_class_indices_where_one_hot_rows_are_expected_are_refused_with_the_fix(name):
  """The commonest slip with a loss taking ``[B, C]`` one-hot labels: ``[B]`` integer indices."""
  with pytest.raises(
      TypeError,
      match=r'^(labels|one_hot): expected a floating-point array, got int32\[4\]; one-hot rows '
      r'of integer class indices: jax.nn.one_hot\(labels, num_classes\)$',
  ):
    _ONE_HOT_LOSSES[name](jnp.zeros((4, 10)), jnp.array([0, 3, 9, 2]))


_INDEX_LOSSES = {
    'uskd': lambda z, y: losses.uskd_loss(z, z, y),
    'ddgsd': lambda z, y: losses.ddgsd_loss(z, z, z, z, y),
}


@pytest.mark.parametrize('name', sorted(_INDEX_LOSSES))
def test_float_labels_where_class_indices_are_expected_are_refused(name):
  """``jnp.asarray(labels, jnp.int32)`` would truncate them: 0.5 became class 0."""
  z = jax.random.normal(jax.random.key(11), (4, 10))
  with pytest.raises(
      TypeError, match=r'^labels: expected integer class indices, got float32\[4\]$'
  ):
    _INDEX_LOSSES[name](z, jnp.array([0.5, 3.0, 9.0, 2.0]))
  chex.assert_shape(_INDEX_LOSSES[name](z, jnp.array([0, 3, 9, 2])), (4,))


_Z = jnp.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]])
_Y = jnp.eye(3)[jnp.array([0, 1])]
_F = jnp.ones((2, 2, 2, 3))

# Each call once silently broadcast, truncated, gave NaN or a value out of its range.
_REFUSED = {
    'sd_dropout batch': (
        lambda: losses.sd_dropout_loss(_Z, _Z[:1]),
        r'^logits_u \(2, 3\) and logits_v \(1, 3\) must have one shape$',
    ),
    'sd_dropout classes': (
        lambda: losses.sd_dropout_loss(_Z, _Z[:, :1]),
        r'^logits_u \(2, 3\) and logits_v \(2, 1\) must have one shape$',
    ),
    'frskd feature batch': (
        lambda: losses.frskd_loss(_Z, _Z, _Y, [_F[:1]], [_F[:1]]),
        r'^features \(1, 2, 2, 3\) and teacher_features \(1, 2, 2, 3\): expected \[B, H, W\] '
        r'equal, with the B = 2 of logits$',
    ),
    'pskd history rows': (
        lambda: losses.pskd_cross_entropy(_Z, _Y, jnp.array([[0.2, 0.3, 0.5]]), alpha=0.5),
        r'^labels \(2, 3\) and past_predictions \(1, 3\) must have one shape$',
    ),
    'pskd alpha shape': (
        lambda: losses.pskd_targets(_Y, _Y, alpha=jnp.array([[0.1], [0.2]])),
        r'^alpha: expected a scalar or shape \(2,\), got \(2, 1\)$',
    ),
    'pskd alpha range': (
        lambda: losses.pskd_targets(_Y, _Y, alpha=1.5),
        r'^alpha: expected a number in \[0, 1\], got 1.5$',
    ),
    'beta_smoothing confidence': (
        lambda: losses.beta_smoothing_targets(_Y, jnp.array([[0.9], [0.2]]), jnp.array([0.7, 0.4])),
        r'^confidence: expected shape \[B\] = \(2,\), got \(2, 1\)$',
    ),
    'beta_smoothing draws': (
        lambda: losses.beta_smoothing_targets(_Y, jnp.array([0.9, 0.2]), jnp.array([0.7])),
        r'^draws: expected shape \[B\] = \(2,\), got \(1,\)$',
    ),
    'mixskd discriminators': (
        lambda: losses.mixskd_loss(
            [_Z],
            [_Z],
            [_F],
            [_F],
            _Z,
            _Z,
            jnp.array([0, 1]),
            lam=0.5,
            perm=jnp.array([1, 0]),
            discriminators=[],
        ),
        r'^discriminators: expected one per exit \(1\), got 0$',
    ),
    'dsr shapes': (
        lambda: losses.dsr_loss(_Z, _Z[:, :2]),
        r'^logits \(2, 3\) and previous_sorted_logits \(2, 2\) must have one shape$',
    ),
    'epsilon': (
        lambda: losses.label_smoothing_targets(_Y, epsilon=1.5),
        r'^epsilon: expected a number in \[0, 1\], got 1.5$',
    ),
    'temperature 0': (
        lambda: losses.distillation_kl(_Z, _Z, temperature=0.0),
        r'^temperature: expected a number in \(0, inf\), got 0.0$',
    ),
    'temperature nan': (
        lambda: losses.sd_dropout_loss(_Z, _Z, temperature=float('nan')),
        r'^temperature: expected a number in \(0, inf\), got nan$',
    ),
}
_TEMPERATURES = {
    'distillation_kl': lambda t: losses.distillation_kl(_Z, _Z, temperature=t),
    'drg': lambda t: losses.drg_loss(_Z, _Z, _Y, temperature=t),
    'dsr': lambda t: losses.dsr_loss(_Z, _Z, temperature=t),
    'sd_dropout': lambda t: losses.sd_dropout_loss(_Z, _Z, temperature=t),
    'byot': lambda t: losses.byot_loss(_Z, [_Z], _Y, temperature=t),
    'dks': lambda t: losses.dks_loss(_Z, [_Z], _Y, temperature=t),
    'frskd': lambda t: losses.frskd_loss(_Z, _Z, _Y, [_F], [_F], temperature=t),
    'tfkd_reg': lambda t: losses.tfkd_reg_loss(_Z, _Y, temperature=t),
    'tfkd_reg_targets': lambda t: losses.tfkd_reg_targets(_Y, temperature=t),
    'bake': lambda t: losses.bake_loss(_Z, _Z, temperature=t),
    'ddgsd': lambda t: losses.ddgsd_loss(_Z, _Z, _Z, _Z, jnp.array([0, 1]), temperature=t),
    'lsskd': lambda t: losses.lsskd_loss(_Z, [jnp.zeros((2, 4, 12))], _Y, temperature=t),
}


@pytest.mark.parametrize('name', sorted(_REFUSED))
def test_arguments_of_the_wrong_shape_or_range_are_refused_naming_them(name):
  call, message = _REFUSED[name]
  with pytest.raises(ValueError, match=message):
    call()


@pytest.mark.parametrize('name', sorted(_TEMPERATURES))
def test_every_temperature_must_be_positive_and_a_traced_one_is_taken_as_is(name):
  with pytest.raises(ValueError, match=r'^temperature: expected a number in \(0, inf\), got -1.0$'):
    _TEMPERATURES[name](-1.0)
  np.testing.assert_allclose(jax.jit(_TEMPERATURES[name])(2.0), _TEMPERATURES[name](2.0), rtol=1e-6)


def test_losses_import_without_tfds_orbax_or_tensorflow():
  import subprocess, sys

  code = (
      'import sys, skd_jax.losses; bad = [m for m in sys.modules if m.split(".")[0] in '
      '("tensorflow", "tensorflow_datasets", "orbax")]; assert not bad, bad'
  )
  subprocess.run([sys.executable, '-c', code], check=True)
