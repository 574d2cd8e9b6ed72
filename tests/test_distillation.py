"""Distillation losses (DRG, DSR, LSSKD and the tempered KL) against closed forms and invariances."""

import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import losses


def _softmax(x):
  e = np.exp(x - np.max(x, -1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def _ce(target, logits):
  return -np.sum(target * np.log(_softmax(logits)), -1)


def test_distillation_kl_two_class_closed_form():
  # Student (b, 0), teacher (a, 0): p = sigmoid(a / T), q = sigmoid(b / T).
  a, b, t = 3.0, -1.0, 4.0
  p, q = 1 / (1 + np.exp(-a / t)), 1 / (1 + np.exp(-b / t))
  expected = t**2 * (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q)))
  got = losses.distillation_kl(jnp.array([[b, 0.0]]), jnp.array([[a, 0.0]]), temperature=t)
  chex.assert_shape(got, (1,))
  np.testing.assert_allclose(got[0], expected, rtol=1e-5)


def test_distillation_kl_is_zero_for_identical_and_positive_otherwise():
  z = jax.random.normal(jax.random.key(0), (5, 7)) * 3
  np.testing.assert_allclose(losses.distillation_kl(z, z, temperature=4.0), 0.0, atol=1e-6)
  other = jax.random.normal(jax.random.key(1), (5, 7)) * 3
  assert np.all(np.asarray(losses.distillation_kl(z, other, temperature=2.0)) > 0)


def test_distillation_kl_stops_the_teacher_gradient_and_scales_by_t_squared():
  z = jax.random.normal(jax.random.key(2), (3, 6))
  t = jax.random.normal(jax.random.key(3), (3, 6))
  grad_teacher = jax.grad(lambda t: losses.distillation_kl(z, t, temperature=4.0).sum())(t)
  np.testing.assert_array_equal(grad_teacher, 0.0)
  # d/dz [T^2 KL(p_t || softmax(z / T))] = T (softmax(z / T) - p_t).
  grad = jax.grad(lambda z: losses.distillation_kl(z, t, temperature=4.0).sum())(z)
  np.testing.assert_allclose(grad, 4.0 * (jax.nn.softmax(z / 4) - jax.nn.softmax(t / 4)), atol=1e-6)


def test_drg_loss_is_head_ce_plus_alpha_kl():
  z = np.array([[2.0, 0.0, -1.0]])
  za = np.array([[0.5, 1.5, 0.0]])
  y = np.array([[0.0, 1.0, 0.0]])
  expected = _ce(y, za) + 0.2 * 16 * _kl(_softmax(za / 4), _softmax(z / 4))
  got = losses.drg_loss(jnp.array(z), jnp.array(za), jnp.array(y), alpha=0.2, temperature=4.0)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # alpha = 0: only the head learns, and the final head gets no gradient.
  grad = jax.grad(lambda z: losses.drg_loss(z, za, y, alpha=0.0).sum())(jnp.array(z))
  np.testing.assert_array_equal(grad, 0.0)


def test_dsr_loss_closed_form_and_zero_for_the_same_shape():
  z = np.array([[0.3, 2.0, -1.0]])
  prev = np.array([[-2.0, 0.0, 1.0]])  # already ascending
  expected = 16 * _kl(_softmax(prev / 4), _softmax(np.sort(z) / 4))
  np.testing.assert_allclose(
      losses.dsr_loss(jnp.array(z), jnp.array(prev), temperature=4.0), expected, rtol=1e-5
  )
  # Same values in a different class order: the ranked shape agrees, so the loss is zero.
  np.testing.assert_allclose(
      losses.dsr_loss(jnp.array([[1.0, -2.0, 0.0]]), jnp.array(prev), temperature=4.0),
      0.0,
      atol=1e-6,
  )


def test_dsr_loss_is_invariant_to_class_permutations():
  z = jax.random.normal(jax.random.key(4), (6, 10)) * 2
  prev = jnp.sort(jax.random.normal(jax.random.key(5), (6, 10)) * 2, axis=-1)
  base = losses.dsr_loss(z, prev)
  for seed in range(3):
    perm = jax.random.permutation(jax.random.key(10 + seed), 10)
    np.testing.assert_allclose(losses.dsr_loss(z[:, perm], prev), base, rtol=1e-6)
    # Per-example permutations too: each row is sorted on its own.
    rows = jax.vmap(lambda k: jax.random.permutation(k, 10))(
        jax.random.split(jax.random.key(20 + seed), 6)
    )
    np.testing.assert_allclose(
        losses.dsr_loss(jnp.take_along_axis(z, rows, -1), prev), base, rtol=1e-6
    )
    # Either argument, as the docstring says: previous rows given unsorted give the same loss.
    np.testing.assert_allclose(
        losses.dsr_loss(z, jnp.take_along_axis(prev, rows, -1)), base, rtol=1e-6
    )


def test_dsr_gradient_flows_through_the_sort():
  z = jax.random.normal(jax.random.key(6), (4, 5))
  prev = jnp.sort(jax.random.normal(jax.random.key(7), (4, 5)), axis=-1)
  grad = jax.grad(lambda z: losses.dsr_loss(z, prev).sum())(z)
  # The gradient of each logit is the gradient at its rank: unsort the sorted-space gradient.
  sorted_grad = 4.0 * (jax.nn.softmax(jnp.sort(z) / 4) - jax.nn.softmax(prev / 4))
  ranks = jnp.argsort(jnp.argsort(z, -1), -1)
  np.testing.assert_allclose(grad, jnp.take_along_axis(sorted_grad, ranks, -1), atol=1e-6)
  jtu.check_grads(
      lambda z: losses.dsr_loss(z, prev),
      (z,),
      order=1,
      modes=['rev'],
      eps=1e-2,
      atol=1e-2,
      rtol=1e-2,
  )


def test_rotation_joint_labels_are_class_major():
  y = jax.nn.one_hot(jnp.array([2, 0]), 3)
  joint = losses.rotation_joint_labels(y)
  chex.assert_shape(joint, (2, 4, 12))
  np.testing.assert_array_equal(jnp.argmax(joint, -1), [[8, 9, 10, 11], [0, 1, 2, 3]])
  np.testing.assert_array_equal(joint.sum(-1), 1.0)


def test_aggregate_joint_logits():
  # joint[b, v, 4 c + k]: encode (v, c, k) in the value to read back what was picked.
  v, c, k = np.meshgrid(np.arange(4), np.arange(3), np.arange(4), indexing='ij')
  joint = jnp.asarray((100 * v + 10 * c + k).reshape(1, 4, 12), jnp.float32)
  # matched: mean over copies v of the score (c, k = v): 100 v + 10 c + v -> 151.5 + 10 c.
  np.testing.assert_allclose(losses.aggregate_joint_logits(joint), [[151.5, 161.5, 171.5]])
  # sum: unrotated copy, summed over k: 40 c + 6.
  np.testing.assert_allclose(losses.aggregate_joint_logits(joint, mode='sum'), [[6.0, 46.0, 86.0]])
  with pytest.raises(ValueError, match='mode'):
    losses.aggregate_joint_logits(joint, mode='max')


def _lsskd_by_hand(z, heads, y, tau, pairing, w_ce, w_kd, w_main):
  """The documented formula in numpy, one term at a time."""
  depth, rotations = len(heads), heads[0].shape[1]
  joint = np.einsum('bc,kj->bkcj', y, np.eye(rotations)).reshape(y.shape[0], rotations, -1)
  loss = w_ce * sum(_ce(joint, s).mean(-1) for s in heads)
  for l in range(depth - 1):
    teacher = heads[-1] if pairing == 'deepest' else heads[l + 1]
    loss += w_kd * tau**2 * _kl(_softmax(teacher / tau), _softmax(heads[l] / tau)).mean(-1)
  s = heads[-1].reshape(y.shape[0], rotations, -1, rotations)
  agg = np.mean([s[:, k, :, k] for k in range(rotations)], 0)
  return loss + w_main * tau**2 * _kl(_softmax(agg / tau), _softmax(z / tau))


@pytest.mark.parametrize('pairing', ['deepest', 'adjacent'])
def test_lsskd_loss_matches_the_documented_formula(pairing):
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5)).astype(np.float32)
  heads = [rng.normal(size=(3, 4, 20)).astype(np.float32) * 2 for _ in range(3)]
  y = np.eye(5, dtype=np.float32)[[1, 4, 0]]
  got = losses.lsskd_loss(
      z,
      heads,
      y,
      temperature=3.0,
      pairing=pairing,
      head_ce_weight=0.5,
      head_kd_weight=2.0,
      main_kd_weight=0.7,
  )
  chex.assert_shape(got, (3,))
  np.testing.assert_allclose(
      got, _lsskd_by_hand(z, heads, y, 3.0, pairing, 0.5, 2.0, 0.7), rtol=1e-5
  )


def test_lsskd_feature_alignment_and_weights():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 3)).astype(np.float32)
  heads = [rng.normal(size=(2, 4, 12)).astype(np.float32) for _ in range(2)]
  feats = [rng.normal(size=(2, 4, 8)).astype(np.float32) for _ in range(2)]
  y = np.eye(3, dtype=np.float32)[[0, 2]]
  base = losses.lsskd_loss(z, heads, y)
  with_features = losses.lsskd_loss(z, heads, y, head_features=feats, feature_weight=0.1)
  expected = 0.1 * np.sum((feats[0] - feats[1]) ** 2, -1).mean(-1)
  np.testing.assert_allclose(with_features - base, expected, rtol=1e-4)
  with pytest.raises(ValueError, match='head_features'):
    losses.lsskd_loss(z, heads, y, feature_weight=0.1)
  with pytest.raises(ValueError, match='pairing'):
    losses.lsskd_loss(z, heads, y, pairing='random')
  # Only the main-head transfer reaches the final logits.
  grad = jax.grad(lambda z: losses.lsskd_loss(z, heads, y, main_kd_weight=0.0).sum())(z)
  np.testing.assert_array_equal(grad, 0.0)


def _random(key, shape, scale=1.0, dtype=jnp.float32):
  return (scale * jax.random.normal(jax.random.key(key), shape)).astype(dtype)


def _saturated(key, shape, dtype):
  return (50.0 * jnp.sign(jax.random.normal(jax.random.key(key), shape))).astype(dtype)


LOSSES = {
    'distillation_kl': lambda z, heads, y: losses.distillation_kl(
        z, heads[0][:, 0, :10], temperature=4.0
    ),
    'drg': lambda z, heads, y: losses.drg_loss(z, heads[0][:, 0, :10], y),
    'dsr': lambda z, heads, y: losses.dsr_loss(z, jnp.sort(heads[1][:, 0, :10], -1)),
    'lsskd': lambda z, heads, y: losses.lsskd_loss(
        z, heads, y, head_features=heads, feature_weight=1e-3
    ),
}


@pytest.mark.parametrize('name', sorted(LOSSES))
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_magnitude_50_logits_give_finite_values_and_gradients(name, dtype):
  z = _saturated(0, (4, 10), dtype)
  heads = [_saturated(i + 1, (4, 4, 40), dtype) for i in range(2)]
  y = jax.nn.one_hot(jnp.array([0, 3, 5, 9]), 10)
  value, grads = jax.value_and_grad(lambda z, h: LOSSES[name](z, h, y).sum(), argnums=(0, 1))(
      z, heads
  )
  assert value.dtype == jnp.float32 and np.isfinite(value)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.parametrize('name', sorted(LOSSES))
def test_jit_matches_eager_per_example_and_gradients_check(name):
  z = _random(0, (3, 10))
  heads = [_random(i + 1, (3, 4, 40)) for i in range(2)]
  y = jax.nn.one_hot(jnp.array([0, 3, 5]), 10)
  fn = lambda z, h: LOSSES[name](z, h, y)
  eager = fn(z, heads)
  chex.assert_shape(eager, (3,))
  np.testing.assert_allclose(jax.jit(fn)(z, heads), eager, rtol=1e-5)
  # Teachers are stop-gradient, so numerical and automatic derivatives agree only in the student.
  jtu.check_grads(
      lambda z: fn(z, heads), (z,), order=1, modes=['rev'], eps=1e-2, atol=1e-2, rtol=1e-2
  )
