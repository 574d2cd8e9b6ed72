"""CS-KD, DLB, SD-Dropout, Beta smoothing and teacher KD on plain arrays: losses and terms."""

import zlib

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import losses
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError
from skd_jax.terms import beta_smoothing, cskd, dlb, sd_dropout, teacher_kd

CONTEXT = terms_lib.Context(num_classes=5, num_epochs=4, batch_size=4, image_shape=(8, 8, 1))


def _logits(key, batch=4, classes=5, scale=2.0):
  return jax.random.normal(jax.random.key(key), (batch, classes)) * scale


def _pass(logits, labels=None, valid=None):
  labels = jnp.arange(logits.shape[0]) % logits.shape[1] if labels is None else labels
  valid = jnp.ones(logits.shape[0], bool) if valid is None else valid
  return terms_lib.Pass(logits, labels, valid)


# --- sd_dropout_loss ---------------------------------------------------------------------------


def test_sd_dropout_loss_is_the_symmetric_kl_in_closed_form():
  u, v = _logits(0), _logits(1)
  for t in (1.0, 3.0):
    qu, qv = jax.nn.softmax(u / t), jax.nn.softmax(v / t)
    expected = t**2 * jnp.sum((qv - qu) * (jnp.log(qv) - jnp.log(qu)), -1)
    np.testing.assert_allclose(losses.sd_dropout_loss(u, v, temperature=t), expected, rtol=1e-5)
    # Symmetric, zero on identical inputs, and the same value with stop-gradient.
    np.testing.assert_allclose(
        losses.sd_dropout_loss(v, u, temperature=t), expected, rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        losses.sd_dropout_loss(u, v, temperature=t, stop_gradient=True), expected, rtol=1e-5
    )
  np.testing.assert_allclose(losses.sd_dropout_loss(u, u), 0.0, atol=1e-6)


def test_sd_dropout_gradients_flow_through_both_sides_unless_detached():
  u, v = _logits(2), _logits(3)
  full = jax.grad(lambda a, b: losses.sd_dropout_loss(a, b).sum(), argnums=(0, 1))(u, v)
  detached = jax.grad(
      lambda a, b: losses.sd_dropout_loss(a, b, stop_gradient=True).sum(), argnums=(0, 1)
  )(u, v)
  # Detached: each side is pulled toward the other by the KL in which it is the student only.
  kl = lambda teacher, student: losses.distillation_kl(student, teacher, temperature=3.0).sum()
  np.testing.assert_allclose(detached[0], jax.grad(kl, argnums=1)(v, u), rtol=1e-5, atol=1e-7)
  assert not np.allclose(full[0], detached[0])
  jtu.check_grads(
      lambda a: losses.sd_dropout_loss(a, v, temperature=3.0),
      (u,),
      order=1,
      modes=['rev'],
      eps=1e-2,
      atol=1e-2,
      rtol=1e-2,
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_sd_dropout_loss_is_finite_for_large_logits(dtype):
  u = (50 * jnp.sign(_logits(0))).astype(dtype)
  v = -u
  value, grad = jax.value_and_grad(lambda a: losses.sd_dropout_loss(a, v).sum())(u)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


# --- beta_smoothing_targets ------------------------------------------------------------------


def test_beta_targets_hand_out_sorted_draws_by_confidence_rank():
  one_hot = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 5)
  confidence = jnp.array([0.2, 0.9, 0.5, 0.1])
  draws = jnp.array([0.6, 0.95, 0.7, 0.8])
  targets = losses.beta_smoothing_targets(one_hot, confidence, draws)
  np.testing.assert_allclose(jnp.sum(targets * one_hot, -1), [0.7, 0.95, 0.8, 0.6])
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(targets[0, 1:], (1 - 0.7) / 4, rtol=1e-6)


def test_beta_targets_rank_only_valid_examples_with_only_their_draws():
  one_hot = jax.nn.one_hot(jnp.array([0, 1, 2, 3]), 5)
  valid = jnp.array([True, False, True, True])
  confidence = jnp.array([0.2, 0.99, 0.5, 0.1])
  draws = jnp.array([0.6, 0.01, 0.7, 0.8])  # slot 1's draw is not used
  targets = losses.beta_smoothing_targets(one_hot, confidence, draws, valid=valid)
  np.testing.assert_allclose(jnp.sum(targets * one_hot, -1), [0.7, 1.0, 0.8, 0.6])


def test_beta_targets_are_equivariant_to_permuting_the_batch():
  one_hot = jax.nn.one_hot(jnp.array([4, 1, 2, 0, 3]), 5)
  confidence, draws = jax.random.uniform(jax.random.key(0), (2, 5))
  perm = jnp.array([3, 0, 4, 1, 2])
  targets = losses.beta_smoothing_targets(one_hot, confidence, draws)
  permuted = losses.beta_smoothing_targets(one_hot[perm], confidence[perm], draws[perm])
  np.testing.assert_allclose(permuted, targets[perm], rtol=1e-6)


# --- terms --------------------------------------------------------------------------------------


def _build(**loss):
  return terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)


def test_cskd_distils_the_partner_prediction_into_the_anchor():
  z, partner = _logits(4), _logits(5)
  inputs = terms_lib.TermInputs(z, jnp.arange(4) % 5, passes={'partner': _pass(partner)})
  term = cskd.CSKD(temperature=4.0)
  np.testing.assert_allclose(
      term(inputs).loss, losses.distillation_kl(z, partner, temperature=4.0), rtol=1e-6
  )
  assert term.forwards == (terms_lib.Forward('partner', 'partner', 'student', grad=False),)
  # A partner that predicts like the anchor teaches nothing.
  same = terms_lib.TermInputs(z, jnp.arange(4) % 5, passes={'partner': _pass(z)})
  np.testing.assert_allclose(term(same).loss, 0.0, atol=1e-6)


def test_dlb_carries_the_logits_and_puts_the_first_steps_previous_half_on_the_current_batch():
  term = dlb.DLB(num_classes=5, batch_size=4, alpha=1.0, temperature=3.0, ce_weight=0.5)
  z0, z1, again = _logits(6), _logits(7), _logits(8)
  labels = jnp.array([0, 1, 2, 3])
  first = terms_lib.TermInputs(
      z0, labels, passes={'previous': _pass(again, labels, jnp.zeros(4, bool))}
  )
  out = term(first, carry=term.init_carry())
  # No previous batch at a run's first step: ce_weight times the current batch's cross-entropy.
  np.testing.assert_allclose(
      out.loss, 0.5 * losses.soft_target_cross_entropy(z0, jax.nn.one_hot(labels, 5)), rtol=1e-6
  )
  np.testing.assert_array_equal(out.carry['logits'], z0)
  valid = jnp.array([True, True, True, False])
  second = terms_lib.TermInputs(z1, labels, passes={'previous': _pass(again, labels, valid)})
  expected = 0.5 * losses.soft_target_cross_entropy(
      again, jax.nn.one_hot(labels, 5)
  ) + losses.distillation_kl(again, z0, temperature=3.0)
  got = term(second, carry=out.carry)
  np.testing.assert_allclose(got.loss, jnp.where(valid, expected, 0.0), rtol=1e-6)
  assert term.carry_sharding == 'batch'
  # The gradient reaches the re-forwarded previous batch, never the carried logits.
  grad = jax.grad(
      lambda prev, carried: term(
          terms_lib.TermInputs(z1, labels, passes={'previous': _pass(prev, labels)}),
          carry={'logits': carried},
      ).loss.sum(),
      argnums=(0, 1),
  )(again, z0)
  assert np.any(grad[0] != 0) and np.all(grad[1] == 0)


def test_sd_dropout_term_drops_the_pooled_feature_with_its_own_key():
  features = jax.random.normal(jax.random.key(9), (4, 6))
  kernel = jax.random.normal(jax.random.key(10), (6, 5))
  classify = lambda h: h @ kernel
  term = sd_dropout.SDDropout(rate=0.5, temperature=3.0)

  def run(key, rate=0.5):
    inputs = terms_lib.TermInputs(
        classify(features),
        jnp.arange(4) % 5,
        outputs={'features': features},
        key=jax.random.key(key),
        classify=classify,
    )
    return sd_dropout.SDDropout(rate=rate)(inputs).loss

  np.testing.assert_array_equal(run(0), run(0))  # the key decides the masks
  assert not np.allclose(run(0), run(1))
  np.testing.assert_allclose(run(0, rate=0.0), 0.0, atol=1e-6)  # no dropout: identical copies
  # The masks by hand: inverted dropout with keep probability 1 - p, independent u and v.
  key_u, key_v = jax.random.split(jax.random.key(0))
  keep_u = jax.random.bernoulli(key_u, 0.5, features.shape)
  keep_v = jax.random.bernoulli(key_v, 0.5, features.shape)
  expected = losses.sd_dropout_loss(
      classify(jnp.where(keep_u, 2 * features, 0)),
      classify(jnp.where(keep_v, 2 * features, 0)),
      temperature=3.0,
  )
  np.testing.assert_allclose(run(0), expected, rtol=1e-5)
  assert term.forwards == () and term.weight == 0.1


def test_beta_smoothing_targets_come_from_the_ema_pass_and_the_terms_key():
  z, ema = _logits(11), _logits(12)
  labels = jnp.arange(4) % 5
  key = jax.random.key(3)
  inputs = terms_lib.TermInputs(z, labels, passes={'ema': _pass(ema, labels)}, key=key)
  term = beta_smoothing.BetaSmoothing()
  confidence = jax.nn.softmax(ema)[jnp.arange(4), labels]
  targets = losses.beta_smoothing_targets(
      jax.nn.one_hot(labels, 5), confidence, jax.random.beta(key, 3.0, 1.0, (4,))
  )
  out = term(inputs)
  np.testing.assert_allclose(out.loss, losses.soft_target_cross_entropy(z, targets), rtol=1e-6)
  assert term.ema_max_decay == 0.999
  assert term.forwards == (terms_lib.Forward('ema', network='ema'),)


def test_teacher_kd_is_hinton_kd_from_the_teacher_pass():
  z, teacher = _logits(13), _logits(14)
  inputs = terms_lib.TermInputs(z, jnp.arange(4) % 5, passes={'teacher': _pass(teacher)})
  np.testing.assert_allclose(
      teacher_kd.TeacherKD(temperature=4.0)(inputs).loss,
      losses.distillation_kl(z, teacher, temperature=4.0),
      rtol=1e-6,
  )


def test_zero_weight_peer_terms_leave_the_cross_entropy_baseline_exactly():
  z, labels = _logits(17), jnp.arange(4) % 5
  features = jax.random.normal(jax.random.key(18), (4, 5))
  baseline = _build(cross_entropy=dict(weight=1.0))
  method = _build(
      cross_entropy=dict(weight=1.0),
      cskd=dict(weight=0.0),
      dlb=dict(weight=0.0),
      sd_dropout=dict(weight=0.0),
      beta_smoothing=dict(weight=0.0),
      teacher_kd=dict(weight=0.0),
  )
  passes = {name: _pass(_logits(19 + i)) for i, name in enumerate(('partner', 'ema', 'teacher'))}
  passes['previous'] = _pass(_logits(23))
  carry = {'dlb': {'logits': _logits(24)}}

  def loss_and_grad(m):
    return jax.value_and_grad(
        lambda z: m(
            terms_lib.TermInputs(
                z,
                labels,
                outputs={'features': features},
                passes=passes,
                key=jax.random.key(0),
                classify=lambda h: h * 2.0,
            ),
            carry=carry,
        ).loss.sum()
    )(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)


# --- composition --------------------------------------------------------------------------------


def test_combined_gives_each_term_its_own_key_from_the_steps_key():
  method = _build(sd_dropout=dict(weight=1.0), beta_smoothing=dict(weight=1.0))
  features = jax.random.normal(jax.random.key(15), (4, 5))
  z = features
  inputs = terms_lib.TermInputs(
      z,
      jnp.arange(4) % 5,
      outputs={'features': features},
      passes={'ema': _pass(_logits(16))},
      key=jax.random.key(7),
      classify=lambda h: h,
  )
  out = method(inputs)
  for term in method.terms:
    own = jax.random.fold_in(jax.random.key(7), zlib.crc32(term.name.encode()))
    alone = term(terms_lib.TermInputs(**{**vars(inputs), 'key': own})).loss
    np.testing.assert_allclose(out.losses[term.name], alone, rtol=1e-6)


def test_combined_collects_forwards_groups_and_the_ema():
  method = _build(cskd=dict(weight=1.0), dlb=dict(weight=1.0), beta_smoothing=dict(weight=1.0))
  assert [f.name for f in method.forwards] == ['ema', 'partner', 'previous']
  assert method.groups == ('partner', 'previous')
  assert method.ema_max_decay == 0.999
  assert method.carry_sharding() == {
      'beta_smoothing': 'replicated',
      'cskd': 'replicated',
      'dlb': 'batch',
  }
  clash = cskd.CSKD(name='other', weight=1.0)
  object.__setattr__(clash, 'forwards', (terms_lib.Forward('partner', grad=True),))
  with pytest.raises(ValueError, match="two different forward passes are named 'partner'"):
    terms_lib.Combined((cskd.CSKD(), clash))


@pytest.mark.parametrize(
    'loss, message',
    [
        (dict(cskd=dict(weight=1.0, temperature=0.0)), r'loss.cskd.temperature: expected'),
        (dict(dlb=dict(weight=1.0, alpha=-1.0)), r'loss.dlb.alpha: expected'),
        (dict(sd_dropout=dict(weight=1.0, rate=1.0)), r'loss.sd_dropout.rate: expected'),
        (
            dict(sd_dropout=dict(weight=1.0, stop_gradient='yes')),
            r'loss.sd_dropout.stop_gradient: expected True or False',
        ),
        (dict(beta_smoothing=dict(weight=1.0, a=0.0)), r'loss.beta_smoothing.a: expected'),
        (
            dict(beta_smoothing=dict(weight=1.0, ema_max_decay=1.5)),
            r'loss.beta_smoothing.ema_max_decay: expected',
        ),
        (dict(teacher_kd=dict(weight=1.0, temprature=4.0)), r'loss.teacher_kd.temprature: unknown'),
    ],
)
def test_invalid_settings_are_config_errors(loss, message):
  with pytest.raises(ConfigError, match=message):
    _build(**loss)
