"""USKD: closed forms and invariances of losses.uskd_loss, the uskd term and its weak head.

The official code's values are checked in tests/test_golden.py.
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
from skd_jax import models
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


def _random(key=0, batch=6, classes=5, scale=3.0):
  k1, k2 = jax.random.split(jax.random.key(key))
  logits = scale * jax.random.normal(k1, (batch, classes))
  weak = jax.random.normal(k2, (batch, classes))
  return logits, weak, jnp.arange(batch) % classes


# --- closed forms ---------------------------------------------------------------------------------


def test_two_classes_one_example():
  """One example: p_hat = 1; two classes: one non-target, whose normalized softmax is 1."""
  z, w, y = jnp.array([[1.5, -0.5]]), jnp.array([[0.3, 0.8]]), jnp.array([0])
  log_p, log_r = _log_softmax(z)[0], _log_softmax(w)[0]
  np.testing.assert_allclose(losses.uskd_loss(z, w, y, alpha=1, beta=0, mu=0), -log_p[0], rtol=1e-6)
  np.testing.assert_array_equal(losses.uskd_loss(z, w, y, alpha=0, beta=1, mu=0), [0.0])
  weak = -(0.95 * log_r[0] + 0.05 * log_r[1])  # 0.9 one-hot + 0.1 / 2
  np.testing.assert_allclose(losses.uskd_loss(z, w, y, alpha=0, beta=0, mu=1), weak, rtol=1e-6)
  np.testing.assert_allclose(
      losses.uskd_loss(z, w, y, alpha=0.1, beta=0.1, mu=0.1), 0.1 * (weak - log_p[0]), rtol=1e-6
  )


def test_target_soft_label_is_the_squared_probability_shifted_to_a_batch_mean_of_one():
  z, w, y = _random()
  log_p_y = _log_softmax(z)[np.arange(6), np.asarray(y)]
  a = np.exp(2 * log_p_y)
  p_hat = a + 1 - a.mean()
  assert abs(p_hat.mean() - 1) < 1e-12 and p_hat.std() > 0.05
  got = losses.uskd_loss(z, w, y, alpha=1, beta=0, mu=0)
  np.testing.assert_allclose(got, -p_hat * log_p_y, rtol=1e-5)
  # Groups of 3: each group's mean. Padding slots are left out of the mean.
  p_hat3 = a + 1 - np.repeat(a.reshape(2, 3).mean(-1), 3)
  got3 = losses.uskd_loss(z, w, y, alpha=1, beta=0, mu=0, group_size=3)
  np.testing.assert_allclose(got3, -p_hat3 * log_p_y, rtol=1e-5)
  valid = np.array([True, True, False, True, True, True])
  p_hat_v = a + 1 - a[valid].mean()
  got_v = losses.uskd_loss(z, w, y, alpha=1, beta=0, mu=0, valid=valid)
  np.testing.assert_allclose(got_v[valid], (-p_hat_v * log_p_y)[valid], rtol=1e-5)


@pytest.mark.parametrize(
    'label, zipf',
    [
        (0, [0, 1 / 2, 1 / 3, 1 / 4]),  # the target ranks first: non-targets start at 1/2
        (1, [1, 0, 1 / 3, 1 / 4]),  # the target ranks second: the top non-target gets 1
    ],
)
def test_non_target_soft_labels_are_zipf_weights_over_the_ranking(label, zipf):
  # A uniform weak head adds the same score to every class: the final head alone ranks.
  z, w, y = jnp.array([[3.0, 2.0, 1.0, 0.0]]), jnp.zeros((1, 4)), jnp.array([label])
  n = np.array(zipf) / np.sum(zipf)
  non_target = [c for c in range(4) if c != label]
  log_q = _log_softmax(np.asarray(z)[0, non_target])
  expected = -np.sum(n[non_target] * log_q)
  np.testing.assert_allclose(
      losses.uskd_loss(z, w, y, alpha=0, beta=1, mu=0), [expected], rtol=1e-6
  )


def test_rank_mix_official_ranks_with_log_probabilities_probs_with_probabilities():
  """METHODS.md §3.12: the final head's log-probabilities dominate the official score.

  The final head puts class 1 above class 2 by 3 in log space (10 below the target); the weak
  head puts nearly all its mass on class 2. Official: order 0, 1, 2, so n = (3/5, 2/5) on classes 1, 2; with
  probabilities the weak head decides: order 0, 2, 1, n = (2/5, 3/5).
  """
  z, w, y = jnp.array([[10.0, 0.0, -3.0]]), jnp.array([[0.0, 0.0, 8.0]]), jnp.array([0])
  log_q = _log_softmax([0.0, -3.0])
  for rank_mix, n in (('official', [0.6, 0.4]), ('probs', [0.4, 0.6])):
    got = losses.uskd_loss(z, w, y, alpha=0, beta=1, mu=0, rank_mix=rank_mix)
    np.testing.assert_allclose(got, [-np.dot(n, log_q)], rtol=1e-6, err_msg=rank_mix)


# --- gradients ------------------------------------------------------------------------------------


def test_soft_labels_carry_no_gradient():
  """d/dz of alpha L_t + beta L_non is alpha p_hat (p - y) plus beta (q - n) on the non-targets;
  the weak head gets gradient from mu L_w only."""
  z, w, y = _random(1)
  ranked = jax.grad(lambda w_: losses.uskd_loss(z, w_, y, alpha=1, beta=1, mu=0).sum())(w)
  np.testing.assert_array_equal(ranked, 0.0)
  one_hot = np.eye(5)[np.asarray(y)]
  p = np.exp(_log_softmax(z))
  a = np.sum(p * one_hot, -1) ** 2
  p_hat = (a + 1 - a.mean())[:, None]
  grad_t = jax.grad(lambda z_: losses.uskd_loss(z_, w, y, alpha=1, beta=0, mu=0).sum())(z)
  np.testing.assert_allclose(grad_t, p_hat * (p - one_hot), rtol=1e-5, atol=1e-7)
  # The non-target term's gradient is zero on the target and sums to zero over the classes.
  grad_n = jax.grad(lambda z_: losses.uskd_loss(z_, w, y, alpha=0, beta=1, mu=0).sum())(z)
  np.testing.assert_allclose(np.sum(grad_n * one_hot, -1), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.sum(grad_n, -1), 0.0, atol=1e-6)


def test_check_grads():
  # alpha = 0: the target term's soft label depends on z but is stopped, so numerical
  # derivatives differ from its gradient by design (tested above). The Zipf labels are constant
  # between ties of the ranking.
  z, w, y = _random(2, scale=1.0)
  fn = lambda z_, w_: losses.uskd_loss(z_, w_, y, alpha=0.0, beta=1.0, mu=1.0)
  jtu.check_grads(fn, (z, w), order=1, modes=['rev'], eps=1e-3)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_are_finite_with_finite_gradients(dtype):
  signs = jnp.sign(jax.random.normal(jax.random.key(8), (2, 4, 10)))
  z, w = (50.0 * signs).astype(dtype)
  y = jnp.array([0, 3, 5, 9])
  value, grads = jax.value_and_grad(
      lambda z_, w_: losses.uskd_loss(z_, w_, y, alpha=1, beta=1, mu=1).sum(), argnums=(0, 1)
  )(z, w)
  assert value.dtype == jnp.float32 and np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


# --- invariances ----------------------------------------------------------------------------------


def test_jit_matches_eager_and_output_is_per_example():
  z, w, y = _random(3)
  fn = lambda *a: losses.uskd_loss(*a, group_size=3)
  eager = fn(z, w, y)
  chex.assert_shape(eager, (6,))
  np.testing.assert_allclose(jax.jit(fn)(z, w, y), eager, rtol=1e-6)


def test_permuting_classes_or_examples_permutes_nothing_else():
  z, w, y = _random(4)
  loss = losses.uskd_loss(z, w, y)
  classes = np.array([3, 0, 4, 1, 2])  # new class c is old class classes[c]
  relabel = np.argsort(classes)[np.asarray(y)]
  np.testing.assert_allclose(
      losses.uskd_loss(z[:, classes], w[:, classes], relabel), loss, rtol=1e-5
  )
  order = np.array([5, 2, 0, 4, 1, 3])
  np.testing.assert_allclose(losses.uskd_loss(z[order], w[order], y[order]), loss[order], rtol=1e-5)


def test_groups_are_independent_and_one_group_is_the_whole_batch():
  z, w, y = _random(5)
  np.testing.assert_array_equal(
      losses.uskd_loss(z, w, y, group_size=6), losses.uskd_loss(z, w, y, group_size=0)
  )
  halves = [losses.uskd_loss(z[s], w[s], y[s]) for s in (slice(0, 3), slice(3, 6))]
  np.testing.assert_allclose(
      losses.uskd_loss(z, w, y, group_size=3), np.concatenate(halves), rtol=1e-6
  )
  with pytest.raises(ValueError, match='group_size: 4 does not divide the batch of 6'):
    losses.uskd_loss(z, w, y, group_size=4)


def test_padding_does_not_change_the_real_examples_losses():
  z, w, y = _random(6)
  valid = np.array([True] * 4 + [False] * 2)
  padded = losses.uskd_loss(z.at[4:].set(9.0), w, y, valid=valid)
  np.testing.assert_allclose(padded[:4], losses.uskd_loss(z[:4], w[:4], y[:4]), rtol=1e-6)


def test_zero_weights_give_zero_and_leave_the_cross_entropy_baseline_exactly():
  z, w, y = _random(7)
  np.testing.assert_array_equal(losses.uskd_loss(z, w, y, alpha=0, beta=0, mu=0), 0.0)
  build = lambda **loss: terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)
  baseline = build(cross_entropy=dict(weight=1.0))
  method = build(cross_entropy=dict(weight=1.0), uskd=dict(weight=0.0))

  def loss_and_grad(m):
    fn = lambda z_: m(terms_lib.TermInputs(z_, y, {'uskd': w})).loss.sum()
    return jax.value_and_grad(fn)(z)

  for got, want in zip(loss_and_grad(method), loss_and_grad(baseline)):
    np.testing.assert_array_equal(got, want)


# --- the term and its head ------------------------------------------------------------------------


def test_the_term_asks_for_a_linear_head_on_the_second_to_last_stage():
  term = terms_lib.build(ml_collections.ConfigDict(dict(uskd=dict(weight=1.0))), CONTEXT).terms[0]
  assert (term.alpha, term.beta, term.mu, term.stage, term.group_size, term.rank_mix) == (
      0.1,
      0.1,
      0.1,
      2,
      0,
      'official',
  )
  assert term.heads() == (terms_lib.HeadRequest('uskd', 2, 'linear', 5),)
  spec = export.ModelSpec(
      'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (8, 8, 1), (0.5,), (0.25,)
  )
  nets = networks.Networks(spec, {'uskd': term.heads()})
  assert isinstance(nets.student.heads[0].module, models.LinearHead)
  variables = jax.eval_shape(nets.init, jax.random.key(0))  # shapes only: nothing compiles
  head = variables['params']['uskd']
  assert jax.tree.map(lambda x: x.shape, head) == {'head': {'kernel': (8, 5), 'bias': (5,)}}
  assert 'uskd' not in nets.inference(variables['params'], variables['batch_stats'])['params']
  z, w, _ = _random(batch=3)
  out = term(terms_lib.TermInputs(z, jnp.arange(3), {'uskd': w}))
  chex.assert_shape(out.loss, (3,))
  assert set(out.metrics) == {'uskd/top1'}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_linear_head_pools_then_applies_one_dense_layer(dtype):
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  head = models.LinearHead(5, dtype=dtype)
  (logits, pooled), variables = head.init_with_output(jax.random.key(1), x, train=True)
  dense = variables['params']['head']
  assert logits.dtype == jnp.float32 and logits.shape == (2, 5) and pooled.dtype == dtype
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pooled.astype(jnp.float32), x.mean(axis=(1, 2)), **tol)
  expected = x.mean(axis=(1, 2)) @ dense['kernel'] + dense['bias']
  np.testing.assert_allclose(logits, expected, **tol)


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(stage=4), r'loss.uskd.stage: expected an integer in \[1, 3\], got 4'),
        (dict(stage='stage2'), r'loss.uskd.stage: expected an integer'),
        (dict(group_size=4), r'loss.uskd.group_size: 4 does not divide the batch size 6'),
        (dict(group_size=-1), r'loss.uskd.group_size: expected an integer'),
        (dict(mu=-0.1), r'loss.uskd.mu: expected a number'),
        (dict(rank_mix='log'), r'loss.uskd.rank_mix: expected one of'),
        (dict(temperature=4.0), r'loss.uskd.temperature: unknown setting'),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
  loss = ml_collections.ConfigDict(dict(uskd=dict(weight=1.0, **settings)))
  with pytest.raises(ConfigError, match=message):
    terms_lib.build(loss, CONTEXT)


@pytest.mark.slow
def test_uskd_trains_on_1_and_8_devices_with_the_same_losses(tmp_path):
  """Groups of 4 span devices (2 examples each on 8) and train as on one device. The head's
  top-1 is measured; the exported model has no head."""
  config = runs.config('uskd', num_epochs=1)
  config.loss.uskd.group_size = 4
  got = {}
  for devices in (1, 8):
    runs.run(config, tmp_path / str(devices), devices=devices)
    records = runs.records(tmp_path / str(devices), 'train')
    assert all(np.isfinite(r['loss/uskd']) and 'uskd/top1' in r for r in records)
    got[devices] = [r['loss'] for r in records]
  # As tests/test_methods.py: the first step to reduction order, later ones to a drift of BN.
  np.testing.assert_allclose(got[8][0], got[1][0], rtol=2e-4)
  np.testing.assert_allclose(got[8], got[1], rtol=1e-2)
  model = export.load_model(tmp_path / '8')
  assert 'uskd' not in model.variables['params']
