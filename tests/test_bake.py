"""BAKE: closed forms and invariances of losses.bake_targets / losses.bake_loss and the bake term.

The official code's values are checked in tests/test_golden.py.
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import losses
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError

CONTEXT = terms_lib.Context(num_classes=5, num_epochs=4, batch_size=6)


def _random(key=0, batch=6, classes=5, dim=4, scale=3.0):
  k1, k2 = jax.random.split(jax.random.key(key))
  return scale * jax.random.normal(k1, (batch, classes)), jax.random.normal(k2, (batch, dim))


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _build(**loss):
  return terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)


# --- closed forms ---------------------------------------------------------------------------------


def test_two_examples_mix_their_predictions_with_weights_one_over_one_plus_omega():
  # B = 2: each example's only neighbour is the other (A = [[0, 1], [1, 0]]), so
  # Q = (1 - w) / (1 - w^2) [[1, w], [w, 1]] P = [[1, w], [w, 1]] P / (1 + w).
  z, f = _random(1, batch=2)
  omega, t = 0.3, 2.0
  p = _softmax(z / t)
  want = np.array([[1, omega], [omega, 1]]) @ p / (1 + omega)
  got = losses.bake_targets(z, f, temperature=t, omega=omega)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_targets_are_the_propagation_fixed_point_with_softmax_cosine_affinities():
  z, f = _random(2)
  omega, t = 0.5, 4.0
  fn = np.asarray(f, np.float64)
  fn = fn / np.linalg.norm(fn, axis=-1, keepdims=True)
  a = np.exp(fn @ fn.T) * (1 - np.eye(6))
  a = a / a.sum(-1, keepdims=True)
  p = _softmax(z / t)
  q = np.asarray(losses.bake_targets(z, f, temperature=t, omega=omega), np.float64)
  np.testing.assert_allclose(q, omega * a @ q + (1 - omega) * p, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
  # Feature scale does not matter (they are normalised).
  np.testing.assert_allclose(losses.bake_targets(z, 7.0 * f, temperature=t, omega=omega), q, 1e-5)


def test_loss_is_t_squared_kl_to_the_targets_and_zero_at_omega_zero_for_the_own_prediction():
  z, f = _random(3)
  t = 4.0
  q = np.asarray(losses.bake_targets(z, f, temperature=t, omega=0.5), np.float64)
  log_p = np.log(_softmax(np.asarray(z) / t))
  want = t**2 * (q * (np.log(q) - log_p)).sum(-1)
  np.testing.assert_allclose(losses.bake_loss(z, f, temperature=t, omega=0.5), want, rtol=1e-5)
  np.testing.assert_allclose(losses.bake_loss(z, f, temperature=t, omega=0.0), 0.0, atol=1e-6)


# --- invariances ----------------------------------------------------------------------------------


def test_permuting_the_batch_permutes_the_losses():
  z, f = _random(4)
  perm = np.array([3, 0, 5, 1, 4, 2])
  loss = losses.bake_loss(z, f)
  np.testing.assert_allclose(losses.bake_loss(z[perm], f[perm]), loss[perm], rtol=1e-5)


def test_padding_slots_do_not_change_the_real_examples_losses():
  z, f = _random(5)
  real = losses.bake_loss(z[:4], f[:4])
  valid = jnp.array([True] * 4 + [False] * 2)
  padded = losses.bake_loss(z, f, valid=valid)
  np.testing.assert_allclose(padded[:4], real, rtol=1e-5)


def _official_targets(z, f, temperature=4.0, omega=0.5):
  """``knowledge_ensemble`` of yxgeee/BAKE in NumPy: softmax of ``ff^T - 1e9 I``, explicit inverse."""
  f = np.asarray(f, np.float64)
  f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  w = f @ f.T - 1e9 * np.eye(len(f))
  w = np.exp(w - w.max(1, keepdims=True))
  w = w / w.sum(1, keepdims=True)
  w = (1 - omega) * np.linalg.inv(np.eye(len(f)) - omega * w)
  return w @ _softmax(np.asarray(z) / temperature)


@pytest.mark.parametrize('batch', [1, 2, 5])
def test_targets_match_the_official_ensemble_down_to_a_batch_of_one(batch):
  """Alone in its batch, an example's row of the official softmax is all on the diagonal: q = p."""
  z, f = _random(6, batch=batch)
  np.testing.assert_allclose(losses.bake_targets(z, f), _official_targets(z, f), atol=1e-6)
  if batch == 1:
    np.testing.assert_allclose(losses.bake_loss(z, f), [0.0], atol=1e-6)


def test_an_example_whose_neighbours_are_all_padding_keeps_its_own_prediction():
  z, f = _random(5)
  valid = jnp.array([True] + [False] * 5)
  q = losses.bake_targets(z, f, valid=valid)
  np.testing.assert_allclose(q[0], _softmax(z[0] / 4.0), rtol=1e-5)
  np.testing.assert_allclose(losses.bake_loss(z, f, valid=valid)[0], 0.0, atol=1e-6)
  np.testing.assert_allclose(jnp.sum(q, -1), 1.0, rtol=1e-5)


def test_a_temperature_or_omega_out_of_range_is_refused_naming_it():
  z, f = _random(7)
  with pytest.raises(ValueError, match=r'^temperature: expected a number in \(0, inf\), got 0.0$'):
    losses.bake_loss(z, f, temperature=0.0)
  with pytest.raises(ValueError, match=r'^omega: expected a number in \[0, 1\), got 1.0$'):
    losses.bake_targets(z, f, omega=1.0)


def test_no_gradient_flows_through_the_ensembled_targets():
  z, f = _random(6)
  t = 4.0
  q = losses.bake_targets(z, f, temperature=t)
  grad_f = jax.grad(lambda f_: losses.bake_loss(z, f_).sum())(f)
  np.testing.assert_array_equal(grad_f, 0.0)
  assert not np.any(jax.grad(lambda z_: losses.bake_targets(z_, f).sum())(z))
  # d/dz of T^2 KL(q || softmax(z / T)) with q fixed: T (softmax(z / T) - q).
  grad_z = jax.grad(lambda z_: losses.bake_loss(z_, f, temperature=t).sum())(z)
  np.testing.assert_allclose(grad_z, t * (_softmax(z / t) - q), rtol=1e-4, atol=1e-6)


def test_jit_matches_eager_and_output_is_per_example():
  z, f = _random(7)
  eager = losses.bake_loss(z, f, temperature=2.0, omega=0.9)
  chex.assert_shape(eager, (6,))
  jitted = jax.jit(lambda a, b: losses.bake_loss(a, b, temperature=2.0, omega=0.9))(z, f)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_inputs_are_finite_with_finite_gradients(dtype):
  z, f = _random(8, scale=1e4)
  z, f = z.astype(dtype), (1e3 * f).astype(dtype)
  loss, grad = jax.value_and_grad(lambda z_: losses.bake_loss(z_, f).sum())(z)
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  assert grad.dtype == dtype and np.isfinite(np.asarray(grad, np.float32)).all()
  zeros = jnp.zeros((6, 4), dtype)  # zero features: F.normalize's epsilon keeps it finite
  assert np.isfinite(np.asarray(losses.bake_loss(z, zeros))).all()


# --- the term -------------------------------------------------------------------------------------


def test_the_term_has_the_official_defaults_and_uses_the_pooled_features():
  term = _build(bake=dict(weight=1.0)).terms[0]
  assert (term.weight, term.temperature, term.omega) == (1.0, 4.0, 0.5)
  z, f = _random(9)
  out = term(terms_lib.TermInputs(z, jnp.arange(6) % 5, {'features': f}))
  np.testing.assert_array_equal(out.loss, losses.bake_loss(z, f))


def test_zero_weight_leaves_the_cross_entropy_baseline_exactly():
  z, f = _random(10)
  labels = jnp.arange(6) % 5
  baseline = _build(cross_entropy=dict(weight=1.0))
  method = _build(cross_entropy=dict(weight=1.0), bake=dict(weight=0.0))

  def loss_and_grad(m):
    fn = lambda z_: m(terms_lib.TermInputs(z_, labels, {'features': f})).loss.sum()
    return jax.value_and_grad(fn)(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(omega=1.0), r'loss.bake.omega: expected a number in \[0.0, 0.99\]'),
        (dict(omega=-0.1), r'loss.bake.omega: expected'),
        (dict(temperature=0.0), r'loss.bake.temperature: expected'),
        (dict(intra_imgs=3), r'loss.bake.intra_imgs: unknown'),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
  with pytest.raises(ConfigError, match=message):
    _build(bake=dict(weight=1.0, **settings))
