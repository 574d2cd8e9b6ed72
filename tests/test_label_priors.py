"""TF-KD (reg) and Zipf's label smoothing on plain arrays: losses and terms.

Both build their target from the label and the current forward pass alone (no teacher network,
no state). tests/test_golden.py compares them with the official PyTorch code.
"""

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import losses
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError

CONTEXT = terms_lib.Context(num_classes=5, num_epochs=4, batch_size=4, image_shape=(8, 8, 1))


def _logits(key, batch=4, classes=5, scale=2.0):
  return jax.random.normal(jax.random.key(key), (batch, classes)) * scale


def _build(**loss):
  return terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)


# --- tfkd_reg ------------------------------------------------------------------------------------


def test_tfkd_reg_teacher_is_the_softened_label_probabilities_in_closed_form():
  # Two classes, one example: u = (a, 1 - a), p^d = softmax(u / T) = sigmoid((2a - 1) / T).
  for a, t in ((0.99, 1.0), (0.99, 20.0), (0.7, 3.0)):
    p = losses.tfkd_reg_targets(jnp.array([[0.0, 1.0]]), correct_prob=a, temperature=t)
    np.testing.assert_allclose(p[0, 1], jax.nn.sigmoid((2 * a - 1) / t), rtol=1e-6)
  # C = 100 with the paper's a = 0.99, T = 20: nearly uniform, the label slightly ahead.
  p = losses.tfkd_reg_targets(jnp.eye(100)[:1], correct_prob=0.99, temperature=20.0)
  bump = np.exp((0.99 - 0.01 / 99) / 20)
  np.testing.assert_allclose(p[0, 0], bump / (bump + 99), rtol=1e-6)
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


def test_tfkd_reg_loss_is_the_kl_to_the_teacher_and_zero_at_the_teacher():
  z, y = _logits(0), jax.nn.one_hot(jnp.arange(4) % 5, 5)
  p = losses.tfkd_reg_targets(y, temperature=20.0)
  expected = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(z)), -1)
  np.testing.assert_allclose(losses.tfkd_reg_loss(z, y), expected, rtol=1e-5)
  # The student is not temperature-scaled: logits log p^d (+ any shift) give exactly 0.
  np.testing.assert_allclose(losses.tfkd_reg_loss(jnp.log(p) + 3.0, y), 0.0, atol=1e-6)
  assert losses.tfkd_reg_loss(z, y).shape == (4,)


def test_tfkd_reg_loss_has_the_kl_gradient_and_agrees_under_jit():
  z, y = _logits(1), jax.nn.one_hot(jnp.arange(4) % 5, 5)
  grad = jax.grad(lambda z: losses.tfkd_reg_loss(z, y, temperature=2.0).sum())(z)
  np.testing.assert_allclose(
      grad, jax.nn.softmax(z) - losses.tfkd_reg_targets(y, temperature=2.0), atol=1e-6
  )
  jtu.check_grads(
      lambda z: losses.tfkd_reg_loss(z, y, temperature=2.0),
      (z,),
      order=1,
      modes=['rev'],
      eps=1e-2,
      atol=1e-2,
      rtol=1e-2,
  )
  np.testing.assert_allclose(
      jax.jit(losses.tfkd_reg_loss)(z, y), losses.tfkd_reg_loss(z, y), rtol=1e-6
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_tfkd_reg_loss_is_finite_for_large_logits(dtype):
  z = (50 * jnp.sign(_logits(2))).astype(dtype)
  y = jax.nn.one_hot(jnp.arange(4) % 5, 5)
  value, grad = jax.value_and_grad(lambda z: losses.tfkd_reg_loss(z, y).sum())(z)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_tfkd_reg_term_defaults_are_the_official_resnet18_ones():
  (term,) = _build(tfkd_reg=dict(weight=0.1)).terms
  assert (term.correct_prob, term.temperature) == (0.99, 20.0)
  z, labels = _logits(3), jnp.arange(4) % 5
  np.testing.assert_allclose(
      term(terms_lib.TermInputs(z, labels)).loss,
      losses.tfkd_reg_loss(z, jax.nn.one_hot(labels, 5)),
      rtol=1e-6,
  )
