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

import runs
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


# --- zipf_ls -------------------------------------------------------------------------------------


def test_zipf_targets_rank_by_votes_with_shared_smallest_ranks_then_drop_the_label():
  votes = jnp.array([[3.0, 5.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0, 9.0]])
  labels = jax.nn.one_hot(jnp.array([1, 2]), 5)
  # Row 0: ranks (2, 1, 5, 2, 4), label 1 (rank 1) removed. Row 1: ranks (2, 2, 2, 2, 1).
  w0 = np.array([1 / 2, 0, 1 / 5, 1 / 2, 1 / 4])
  w1 = np.array([1 / 2, 1 / 2, 0, 1 / 2, 1])
  np.testing.assert_allclose(
      losses.zipf_targets(votes, labels), np.stack([w0 / w0.sum(), w1 / w1.sum()]), rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.zipf_targets(votes, labels, power=2.0)[0], w0**2 / np.sum(w0**2), rtol=1e-6
  )
  # Equal votes everywhere: the uniform distribution over the other classes (power 0 too).
  uniform = np.full((1, 5), 0.25) * (1 - np.eye(5)[:1])
  np.testing.assert_allclose(losses.zipf_targets(jnp.ones((1, 5)), jnp.eye(5)[:1]), uniform)
  np.testing.assert_allclose(
      losses.zipf_targets(votes[:1], jnp.eye(5)[:1], power=0.0), uniform, rtol=1e-6
  )


def test_dense_class_votes_count_each_locations_argmax():
  dense = jax.random.normal(jax.random.key(4), (3, 7, 5))
  votes = losses.dense_class_votes(dense)
  np.testing.assert_array_equal(votes.sum(-1), 7.0)
  np.testing.assert_array_equal(votes, jax.nn.one_hot(jnp.argmax(dense, -1), 5).sum(1))


def test_zipf_ls_loss_in_closed_form_and_independent_of_the_target_logit():
  z, labels = _logits(5), jnp.arange(4) % 5
  y = jax.nn.one_hot(labels, 5)
  votes = jax.random.randint(jax.random.key(6), (4, 5), 0, 6).astype(jnp.float32)
  q = losses.zipf_targets(votes, y)
  expected = []
  for i in range(4):
    others = np.delete(np.arange(5), int(labels[i]))
    log_p = jax.nn.log_softmax(z[i, others])
    expected.append(np.sum(q[i, others] * (np.log(q[i, others]) - log_p)))
  got = losses.zipf_ls_loss(z, y, votes)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert got.shape == (4,)
  np.testing.assert_allclose(losses.zipf_ls_loss(z + 10.0 * y, y, votes), got, rtol=1e-5)
  # Zero at the prior itself; the label's logit gets no gradient.
  np.testing.assert_allclose(
      losses.zipf_ls_loss(jnp.log(jnp.where(y > 0, 1.0, q)), y, votes), 0.0, atol=1e-6
  )
  grad = jax.grad(lambda z: losses.zipf_ls_loss(z, y, votes).sum())(z)
  np.testing.assert_array_equal(jnp.where(y > 0, grad, 0.0), 0.0)
  np.testing.assert_allclose(jax.jit(losses.zipf_ls_loss)(z, y, votes), got, rtol=1e-6)
  jtu.check_grads(
      lambda z: losses.zipf_ls_loss(z, y, votes),
      (z,),
      order=1,
      modes=['rev'],
      eps=1e-2,
      atol=1e-2,
      rtol=1e-2,
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_zipf_ls_loss_is_finite_for_large_logits(dtype):
  z = (50 * jnp.sign(_logits(7))).astype(dtype)
  y = jax.nn.one_hot(jnp.arange(4) % 5, 5)
  votes = jnp.arange(20.0).reshape(4, 5)
  value, grad = jax.value_and_grad(lambda z: losses.zipf_ls_loss(z, y, votes).sum())(z)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_zipf_ls_term_votes_with_the_classifier_on_the_upsampled_map():
  features = jax.random.normal(jax.random.key(8), (4, 2, 2, 3))
  kernel = jax.random.normal(jax.random.key(9), (3, 5))
  classify = lambda h: h @ kernel
  z, labels = _logits(10), jnp.arange(4) % 5
  (term,) = _build(zipf_ls=dict(weight=0.1)).terms
  assert (term.upsample, term.power) == ('bilinear', 1.0)
  inputs = terms_lib.TermInputs(z, labels, outputs={'feature_map': features}, classify=classify)
  up = jax.image.resize(features, (4, 4, 4, 3), 'bilinear')
  votes = losses.dense_class_votes((up @ kernel).reshape(4, 16, 5))
  out = term(inputs)
  np.testing.assert_allclose(
      out.loss, losses.zipf_ls_loss(z, jax.nn.one_hot(labels, 5), votes), rtol=1e-6
  )
  np.testing.assert_array_equal(
      out.metrics['zipf_ls/label_votes_first'], jnp.argmax(votes, -1) == labels
  )
  # A 2x2 map upsampled x2 by half-pixel bilinear interpolation: the corners keep their values.
  np.testing.assert_allclose(up[:, ::3, ::3], features, rtol=1e-6)
  # Without upsampling, 4 votes per example; gradients reach the logits only.
  (plain,) = _build(zipf_ls=dict(weight=0.1, upsample='none')).terms
  votes = losses.dense_class_votes((features @ kernel).reshape(4, 4, 5))
  np.testing.assert_allclose(
      plain(inputs).loss, losses.zipf_ls_loss(z, jax.nn.one_hot(labels, 5), votes), rtol=1e-6
  )
  grad = jax.grad(
      lambda f: term(
          terms_lib.TermInputs(z, labels, outputs={'feature_map': f}, classify=classify)
      ).loss.sum()
  )(features)
  np.testing.assert_array_equal(grad, 0.0)


# --- both ----------------------------------------------------------------------------------------


def test_zero_weight_terms_leave_the_cross_entropy_baseline_exactly():
  z, labels = _logits(11), jnp.arange(4) % 5
  features = jax.random.normal(jax.random.key(12), (4, 3, 3, 5))
  baseline = _build(cross_entropy=dict(weight=1.0))
  method = _build(
      cross_entropy=dict(weight=1.0), tfkd_reg=dict(weight=0.0), zipf_ls=dict(weight=0.0)
  )

  def loss_and_grad(m):
    return jax.value_and_grad(
        lambda z: m(
            terms_lib.TermInputs(
                z, labels, outputs={'feature_map': features}, classify=lambda h: h * 2.0
            )
        ).loss.sum()
    )(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    'loss, message',
    [
        (dict(tfkd_reg=dict(weight=1.0, temperature=0.0)), r'loss.tfkd_reg.temperature: expected'),
        (
            dict(tfkd_reg=dict(weight=1.0, correct_prob=1.5)),
            r'loss.tfkd_reg.correct_prob: expected',
        ),
        (dict(tfkd_reg=dict(weight=1.0, multiplier=100.0)), r'loss.tfkd_reg.multiplier: unknown'),
        (
            dict(zipf_ls=dict(weight=1.0, upsample='nearest')),
            r'loss.zipf_ls.upsample: expected one',
        ),
        (dict(zipf_ls=dict(weight=1.0, power=-1.0)), r'loss.zipf_ls.power: expected'),
    ],
)
def test_invalid_settings_are_config_errors(loss, message):
  with pytest.raises(ConfigError, match=message):
    _build(**loss)


@pytest.mark.slow
def test_both_train_in_the_trainer_on_1_and_8_devices_with_the_same_losses(tmp_path):
  """Zipf's votes use the student's own classifier on its sharded feature map."""
  config = runs.config('zipf_ls', num_epochs=1)
  config.loss.tfkd_reg = dict(weight=0.1)
  runs.run(config, tmp_path / 'one', devices=1)
  runs.run(config, tmp_path / 'eight', devices=8)
  one, eight = runs.records(tmp_path / 'one', 'train'), runs.records(tmp_path / 'eight', 'train')
  for record in one + eight:
    assert all(np.isfinite(record[f'loss/{t}']) for t in ('cross_entropy', 'tfkd_reg', 'zipf_ls'))
    assert 0.0 <= record['zipf_ls/label_votes_first'] <= 1.0
  np.testing.assert_allclose(one[0]['loss'], eight[0]['loss'], rtol=2e-4)
  np.testing.assert_allclose([r['loss'] for r in one], [r['loss'] for r in eight], rtol=1e-2)
