"""Tests for skd_jax.metrics: hand-computed values for every metric."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import metrics

# ----------------------------------------------------------------------------------------------
# per_example_stats
# ----------------------------------------------------------------------------------------------


def _log_sum_exp(values):
  return math.log(sum(math.exp(v) for v in values))


def test_per_example_stats_three_classes_by_hand():
  logits = jnp.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
  labels = jnp.array([0, 2])
  stats = metrics.per_example_stats(logits, labels)

  assert set(stats) == {'confidence', 'correct', 'top5', 'nll'}
  for value in stats.values():
    assert value.shape == (2,)
    assert value.dtype == jnp.float32

  # Row 0: argmax 0 == label; p_max = e^2 / (e^2 + e + 1); nll = lse - 2.
  # Row 1: argmax 1 != label 2; p_max = e^3 / (1 + e^3 + e); nll = lse - 1.
  lse0 = _log_sum_exp([2.0, 1.0, 0.0])
  lse1 = _log_sum_exp([0.0, 3.0, 1.0])
  np.testing.assert_allclose(
      stats['confidence'], [math.exp(2 - lse0), math.exp(3 - lse1)], rtol=1e-6
  )
  np.testing.assert_array_equal(stats['correct'], [1.0, 0.0])
  # C = 3 < 5, so k = 3 and every label is in the "top 5".
  np.testing.assert_array_equal(stats['top5'], [1.0, 1.0])
  np.testing.assert_allclose(stats['nll'], [lse0 - 2.0, lse1 - 1.0], rtol=1e-6)


def test_per_example_stats_ten_classes_top5():
  ascending = jnp.arange(10, dtype=jnp.float32)
  logits = jnp.stack([ascending, ascending, ascending[::-1], ascending])
  # Top-5 of `ascending` is classes 5..9; of the reversed row, classes 0..4.
  labels = jnp.array([5, 4, 0, 9])
  stats = metrics.per_example_stats(logits, labels)

  np.testing.assert_array_equal(stats['top5'], [1.0, 0.0, 1.0, 1.0])
  np.testing.assert_array_equal(stats['correct'], [0.0, 0.0, 1.0, 1.0])
  lse = _log_sum_exp(range(10))
  np.testing.assert_allclose(stats['nll'], [lse - 5, lse - 4, lse - 9, lse - 9], rtol=1e-6)
  np.testing.assert_allclose(stats['confidence'], [math.exp(9 - lse)] * 4, rtol=1e-6)


def test_per_example_stats_jit_matches_eager():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(16, 10)) * 3.0, dtype=jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, size=16))
  eager = metrics.per_example_stats(logits, labels)
  jitted = jax.jit(metrics.per_example_stats)(logits, labels)
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, atol=1e-7)

  # And against a hand-rolled numpy reference.
  z = np.asarray(logits, dtype=np.float64)
  y = np.asarray(labels)
  log_probs = z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))
  np.testing.assert_allclose(eager['nll'], -log_probs[np.arange(16), y], rtol=1e-5)
  np.testing.assert_allclose(eager['confidence'], np.exp(log_probs.max(axis=1)), rtol=1e-5)
  np.testing.assert_array_equal(eager['correct'], (z.argmax(axis=1) == y).astype(np.float32))
  top5 = np.argsort(-z, axis=1)[:, :5]
  np.testing.assert_array_equal(eager['top5'], np.any(top5 == y[:, None], axis=1))


def test_per_example_stats_low_precision_input_is_float32():
  logits = jnp.array([[2.0, 1.0, 0.0]], dtype=jnp.bfloat16)
  stats = metrics.per_example_stats(logits, jnp.array([1]))
  for value in stats.values():
    assert value.dtype == jnp.float32
  np.testing.assert_allclose(stats['nll'], [_log_sum_exp([2.0, 1.0, 0.0]) - 1.0], rtol=1e-6)


def test_per_example_stats_large_logits_are_stable():
  # log(softmax) would hit log(0) for the -50 entries; log_softmax must not.
  logits = jnp.array([[50.0, -50.0, -50.0], [-50.0, 50.0, -50.0]])
  labels = jnp.array([1, 1])
  stats = jax.jit(metrics.per_example_stats)(logits, labels)
  assert np.all(np.isfinite(stats['nll']))
  # nll = logsumexp(z) - z_y = 50 + log(1 + 2e^-100) - z_y.
  np.testing.assert_allclose(stats['nll'], [100.0, 0.0], atol=1e-5)
  np.testing.assert_allclose(stats['confidence'], [1.0, 1.0], atol=1e-6)


def test_per_example_stats_rejects_bad_shapes():
  with pytest.raises(ValueError, match='logits'):
    metrics.per_example_stats(jnp.zeros((4,)), jnp.zeros((4,), jnp.int32))
  with pytest.raises(ValueError, match='labels'):
    metrics.per_example_stats(jnp.zeros((4, 3)), jnp.zeros((3,), jnp.int32))


# ----------------------------------------------------------------------------------------------
# expected_calibration_error
# ----------------------------------------------------------------------------------------------


def test_ece_by_hand_with_right_closed_boundary():
  # Bins (10 of width 0.1, right-closed):
  #   0.0  -> first bin (0, 0.1]   (zero is put in the first bin): acc 0, conf 0   -> gap 0
  #   0.3  -> (0.2, 0.3], 0.25 -> (0.2, 0.3]: acc 1/2, conf 0.275 -> |gap| 0.225, n 2
  #   0.95, 1.0 -> (0.9, 1.0]:               acc 1,   conf 0.975 -> |gap| 0.025, n 2
  # ECE = (2 * 0.225 + 2 * 0.025) / 5 = 0.1 -> 10 %.
  # (Had 0.3 gone to (0.3, 0.4], ECE would be (0.25 + 0.7 + 0.05) / 5 = 0.2 -> 20 %.)
  confidence = np.array([0.3, 0.25, 0.95, 0.0, 1.0])
  correct = np.array([1, 0, 1, 0, 1])
  assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(10.0)


def _official_ece(confidences, correct, bin_size=0.1):
  """The PS-KD code's ECE transcribed as loops over Python floats: the oracle for the tests."""
  confidences = [float(c) for c in confidences]
  total = len(confidences)
  contributions = []
  for upper in np.arange(bin_size, 1 + bin_size, bin_size):
    lower = upper - bin_size
    members = [(c, k) for c, k in zip(confidences, correct) if c > lower and c <= upper]
    if not members:
      contributions.append(0)
      continue
    accuracy = float(len([k for _, k in members if k])) / len(members)
    average = sum([c for c, _ in members]) / len(members)
    contributions.append(abs(accuracy - average) * len(members))
  return 100 * sum(contributions) / total


def test_ece_float32_point_three_falls_in_the_bin_above_as_in_the_official_code():
  # float32(0.3) = 0.30000001192..., above the float64 edge 0.30000000000000004: bin (0.3, 0.4].
  # (0.2, 0.3]: 0.25 wrong -> 0.25; (0.3, 0.4]: 0.3 right -> 0.7; (0.9, 1.0]: 0.95, 1.0 -> 0.05.
  # Zero is in no bin (the first is (0, 0.1]) but counts: ECE = (0.25 + 0.7 + 0.05) / 5 -> 20 %.
  confidence = np.array([0.3, 0.25, 0.95, 0.0, 1.0], dtype=np.float32)
  correct = np.array([1, 0, 1, 0, 1], dtype=np.float32)
  ece = metrics.expected_calibration_error(confidence, correct)
  assert ece == pytest.approx(20.0, abs=1e-5)
  assert ece == _official_ece(confidence, correct)


def test_ece_a_confidence_on_a_float64_edge_falls_in_no_bin_but_counts():
  # 0.20000000000000004 is the float64 lower edge of the third bin and above the second's upper
  # edge 0.2: in no bin. Alone with a right example at 0.95, ECE = |1 - 0.95| * 1 / 2 -> 2.5 %.
  confidence = np.array([0.20000000000000004, 0.95])
  correct = np.array([0, 1])
  assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(2.5)
  assert metrics.expected_calibration_error(confidence, correct) == _official_ece(
      confidence, correct
  )


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ece_equals_the_official_code_bit_for_bit(seed):
  rng = np.random.default_rng(seed)
  edges = np.arange(0.1, 1.1, 0.1)
  near_edges = np.concatenate([edges, edges - 0.1, np.nextafter(edges, 2), np.nextafter(edges, 0)])
  confidence = np.concatenate([rng.random(500), near_edges, [0.0, 1.0]]).astype(np.float32)
  correct = (rng.random(confidence.size) < 0.7).astype(np.float32)
  assert metrics.expected_calibration_error(confidence, correct) == _official_ece(
      confidence, correct
  )


def test_ece_separate_bins_and_num_bins():
  # 10 bins: each example alone in its bin, ECE = (0.1 + 0.8 + 0.3 + 0.6) / 4 = 0.45 -> 45 %.
  confidence = np.array([0.9, 0.8, 0.7, 0.6])
  correct = np.array([1, 0, 1, 0])
  assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(45.0)
  # 1 bin: |mean acc - mean conf| = |0.5 - 0.75| = 0.25 -> 25 %.
  assert metrics.expected_calibration_error(confidence, correct, num_bins=1) == pytest.approx(25.0)
  # 2 bins: (0, 0.5] empty; (0.5, 1] holds everything -> same 25 %.
  assert metrics.expected_calibration_error(confidence, correct, num_bins=2) == pytest.approx(25.0)


def test_ece_perfectly_calibrated_is_zero():
  # Two bins, each with acc == conf: (0.4, 0.5] acc 1/2 conf 0.5; (0.9, 1.0] acc 1 conf 1.
  confidence = np.array([0.5, 0.5, 1.0])
  correct = np.array([1, 0, 1])
  assert metrics.expected_calibration_error(confidence, correct) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_reliability_bins_give_back_the_ece(seed):
  rng = np.random.default_rng(seed)
  edges = np.arange(0.1, 1.1, 0.1)
  near_edges = np.concatenate([edges, edges - 0.1, np.nextafter(edges, 2), np.nextafter(edges, 0)])
  confidence = np.concatenate([rng.random(500), near_edges, [0.0, 1.0]])
  if seed:  # float32 confidences as the model gives them; float64 ones hit the edges exactly
    confidence = confidence.astype(np.float32)
  correct = (rng.random(confidence.size) < 0.7).astype(np.float32)
  bins = metrics.reliability_bins(confidence, correct)
  assert set(bins) == {'count', 'confidence', 'accuracy'}
  assert all(len(v) == 10 for v in bins.values())
  assert all(type(c) is int for c in bins['count'])  # pylint: disable=unidiomatic-typecheck
  # 0 and the values on a rounded edge are in no bin, but count in N.
  assert 0 < confidence.size - sum(bins['count']) < 12
  gaps = [n * abs(a - c) for n, a, c in zip(*bins.values())]
  ece = 100 * sum(gaps) / confidence.size
  assert abs(ece - metrics.expected_calibration_error(confidence, correct)) < 1e-9
  for k, (n, c, a) in enumerate(zip(bins['count'], bins['confidence'], bins['accuracy'])):
    if n:
      assert k / 10 - 1e-7 <= c <= (k + 1) / 10 + 1e-7 and 0 <= a <= 1
    else:
      assert c == a == 0


def test_evaluate_records_the_reliability_bins_of_every_model():
  from skd_jax import evaluation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  stats = {
      'confidence': rng.random(12).astype(np.float32),
      'correct': (rng.random(12) < 0.5).astype(np.float32),
      'top5': np.ones(12, np.float32),
      'nll': rng.random(12).astype(np.float32),
      'valid': np.arange(12) < 10,  # the last two are padding
  }

  class Test:

    def batches(self):
      yield (slice(0, 6),)
      yield (slice(6, 12),)

  shift = {'': 0.0, 'ema/': 0.05}
  eval_fn = lambda prefix, rows: {
      k: v[rows] - shift[prefix] if k == 'confidence' else v[rows] for k, v in stats.items()
  }
  result = evaluation.evaluate(eval_fn, Test(), {'': '', 'ema/': 'ema/'})
  for prefix in shift:
    valid = {k: v[:10] for k, v in stats.items()}
    confidence = valid['confidence'] - shift[prefix]
    assert result[prefix + 'reliability'] == metrics.reliability_bins(confidence, valid['correct'])
    assert result[prefix + 'ece'] == metrics.expected_calibration_error(
        confidence, valid['correct']
    )


# ----------------------------------------------------------------------------------------------
# aurc / eaurc
# ----------------------------------------------------------------------------------------------


def test_aurc_by_hand():
  # Sorted by confidence: 0.9 (ok), 0.8 (err), 0.7 (ok), 0.6 (err); given shuffled.
  # Risks at k = 1..4: 0/1, 1/2, 1/3, 2/4. AURC = (0 + 1/2 + 1/3 + 1/2) / 4 = 1/3 -> 333.33.
  confidence = np.array([0.7, 0.9, 0.6, 0.8])
  correct = np.array([1, 1, 0, 0])
  assert metrics.aurc(confidence, correct) == pytest.approx(1000.0 / 3.0)
  # AURC_opt (N=4, r=2) = (1/4) * (1/3 + 2/4) = 5/24; E-AURC = 1/3 - 5/24 = 1/8 -> 125.
  assert metrics.eaurc(confidence, correct) == pytest.approx(125.0)


def test_aurc_ties_follow_the_official_reversed_argsort():
  # numpy's argsort puts the tie in input order, [0, 1]; reversed, example 1 comes first.
  # Errors then [0, 1] -> risks 0, 1/2 -> 0.25.
  assert metrics.aurc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(250.0)
  assert metrics.aurc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(750.0)


@pytest.mark.parametrize('seed', [0, 1])
def test_aurc_and_eaurc_equal_the_official_code_bit_for_bit(seed):
  rng = np.random.default_rng(seed)
  confidence = rng.choice(np.float32([0.2, 0.5, 0.7, 0.9]), 300)  # many ties
  correct = (rng.random(300) < 0.6).astype(np.float32)
  # The official calc_aurc, step by step, on Python floats.
  max_confs = np.array([float(c) for c in confidence])
  order = np.argsort(max_confs)[::-1]
  wrong = correct[order] == 0
  risks = np.divide(np.cumsum(wrong).astype(float), np.arange(1, 301))
  r = int(np.sum(wrong))
  optimum = (1.0 / 300) * np.sum(
      np.divide(np.arange(1, r + 1).astype(float), 300 - r + np.arange(1, r + 1))
  )
  assert metrics.aurc(confidence, correct) == np.mean(risks) * 1000
  assert metrics.eaurc(confidence, correct) == (np.mean(risks) - optimum) * 1000


def test_aurc_extremes():
  confidence = np.array([0.9, 0.6, 0.3])
  assert metrics.aurc(confidence, np.ones(3)) == 0.0
  assert metrics.eaurc(confidence, np.ones(3)) == 0.0
  # All wrong: every risk is 1, AURC = 1000; the optimum is also all ones, so E-AURC = 0.
  assert metrics.aurc(confidence, np.zeros(3)) == pytest.approx(1000.0)
  assert metrics.eaurc(confidence, np.zeros(3)) == pytest.approx(0.0, abs=1e-9)


def test_eaurc_zero_for_perfect_ranking_positive_otherwise():
  correct = np.array([1, 1, 1, 0, 0])
  perfect = np.array([0.9, 0.8, 0.7, 0.6, 0.5])  # Errors last.
  assert metrics.eaurc(perfect, correct) == pytest.approx(0.0, abs=1e-9)
  # AURC of the perfect ranking = (1/5) * (1/4 + 2/5) = 0.13 -> 130.
  assert metrics.aurc(perfect, correct) == pytest.approx(130.0)

  swapped = np.array([0.9, 0.8, 0.6, 0.7, 0.5])  # One error ranked above a correct one.
  # Errors in order [0, 0, 1, 0, 1]: risks 0, 0, 1/3, 1/4, 2/5 -> AURC = 59/300.
  assert metrics.aurc(swapped, correct) == pytest.approx(1000.0 * 59.0 / 300.0)
  assert metrics.eaurc(swapped, correct) == pytest.approx(1000.0 * (59.0 / 300.0 - 0.13))
  assert metrics.eaurc(swapped, correct) > 0.0


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_aurc_opt_formula_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n = 200
  correct = (rng.random(n) < 0.7).astype(np.float64)
  confidence = rng.random(n)
  # Ideal ranking: every correct example more confident than every error.
  ideal = correct + 0.5 * rng.random(n)
  aurc_opt_brute = metrics.aurc(ideal, correct)

  r = int(n - correct.sum())
  j = np.arange(1, r + 1)
  aurc_opt_formula = 1000.0 * np.sum(j / (n - r + j)) / n
  assert aurc_opt_brute == pytest.approx(aurc_opt_formula, rel=1e-12)

  assert metrics.eaurc(ideal, correct) == pytest.approx(0.0, abs=1e-9)
  assert metrics.eaurc(confidence, correct) == pytest.approx(
      metrics.aurc(confidence, correct) - aurc_opt_brute, rel=1e-12
  )
  assert metrics.eaurc(confidence, correct) > 0.0


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('fn', [metrics.expected_calibration_error, metrics.aurc, metrics.eaurc])
def test_host_metrics_validate_inputs(fn):
  with pytest.raises(ValueError, match='1-D'):
    fn(np.zeros((2, 2)), np.zeros(4))
  with pytest.raises(ValueError, match='1-D'):
    fn(np.zeros(4), np.zeros((2, 2)))
  with pytest.raises(ValueError, match='same length'):
    fn(np.zeros(4), np.zeros(3))
  with pytest.raises(ValueError, match='at least one'):
    fn(np.zeros(0), np.zeros(0))


def test_ece_rejects_bad_num_bins():
  with pytest.raises(ValueError, match='num_bins'):
    metrics.expected_calibration_error(np.array([0.5]), np.array([1]), num_bins=0)


# ----------------------------------------------------------------------------------------------
# summarize
# ----------------------------------------------------------------------------------------------


def test_summarize_by_hand():
  stats = {
      'confidence': np.array([0.9, 0.8, 0.7, 0.6], dtype=np.float32),
      'correct': np.array([1, 0, 1, 0], dtype=np.float32),
      'top5': np.array([1, 1, 1, 0], dtype=np.float32),
      'nll': np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32),
  }
  summary = metrics.summarize(stats)
  assert set(summary) == {'top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc'}
  for value in summary.values():
    assert type(value) is float
  assert summary['top1'] == pytest.approx(50.0)
  assert summary['top5'] == pytest.approx(75.0)
  assert summary['nll'] == pytest.approx(0.25, rel=1e-6)
  # float32 0.8 and 0.6 lie just above their float64 edges and join 0.9 and 0.7 in the bins above
  # (official binning): |0.5 - 0.85| * 2 + |0.5 - 0.65| * 2 = 1.0, over 4 -> 25 %.
  assert summary['ece'] == pytest.approx(25.0, rel=1e-6)
  # Same ranking as test_aurc_by_hand: AURC = 1/3, AURC_opt = 5/24.
  assert summary['aurc'] == pytest.approx(1000.0 / 3.0)
  assert summary['eaurc'] == pytest.approx(125.0)


def test_summarize_end_to_end_from_per_example_stats():
  logits = jnp.array([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
  labels = jnp.array([0, 0, 0, 2])
  stats = jax.device_get(jax.jit(metrics.per_example_stats)(logits, labels))
  summary = metrics.summarize(stats)
  assert summary['top1'] == pytest.approx(75.0)
  assert summary['top5'] == pytest.approx(100.0)
  expected_nll = np.mean(
      [
          _log_sum_exp([3, 0, 0]) - 3,
          _log_sum_exp([0, 2, 0]) - 0,
          _log_sum_exp([1, 0, 0]) - 1,
          _log_sum_exp([0, 0, 0.5]) - 0.5,
      ]
  )
  assert summary['nll'] == pytest.approx(expected_nll, rel=1e-6)
  conf = np.asarray(stats['confidence'])
  corr = np.asarray(stats['correct'])
  assert summary['ece'] == pytest.approx(metrics.expected_calibration_error(conf, corr))
  assert summary['aurc'] == pytest.approx(metrics.aurc(conf, corr))
  assert summary['eaurc'] == pytest.approx(metrics.eaurc(conf, corr))


def test_summarize_validates():
  good = {key: np.ones(3) for key in ('confidence', 'correct', 'top5', 'nll')}
  with pytest.raises(ValueError, match='missing'):
    metrics.summarize({key: v for key, v in good.items() if key != 'nll'})
  with pytest.raises(ValueError, match='same length'):
    metrics.summarize({**good, 'top5': np.ones(2)})
  with pytest.raises(ValueError, match='1-D'):
    metrics.summarize({**good, 'nll': np.ones((3, 1))})
  with pytest.raises(ValueError, match='at least one'):
    metrics.summarize({key: np.ones(0) for key in good})


# 1,599 test examples on 8 CPU devices, evaluated in one batch and in 200 of 8; each batch's
# program gathers its examples across the devices (eval_step), and 100 matrix products keep the
# devices behind the host. XLA's timeouts for a stuck collective are cut from 20 + 40 s to 10 + 10 s.
_MANY_BATCHES = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
from skd_jax import evaluation, mesh as mesh_lib
from skd_jax.data import sources

class Networks:
  @staticmethod
  def apply_inference(w, images):
    x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
    x = jax.lax.fori_loop(0, 100, lambda _, x: jnp.tanh(x @ w), x)
    return x[:, :4], None

rng = np.random.default_rng(0)
images = rng.integers(0, 256, (1599, 16, 16, 1), np.uint8)
labels = rng.integers(0, 4, 1599).astype(np.int32)
mesh = mesh_lib.make_mesh()
data = sources.to_devices(images, labels, mesh)
w = jnp.asarray(rng.normal(size=(256, 256)) / 16, jnp.float32)
results = []
for batch_size in (1600, 8):
  fn = jax.jit(lambda v, *a, b=batch_size: evaluation.eval_step(
      v, *a, networks=Networks, mesh=mesh, batch_size=b))
  results.append(evaluation.evaluate(fn, sources.DeviceEvalSet(data, batch_size), {'': w}))
print(json.dumps(results))
"""


def test_evaluate_many_small_batches_on_several_devices_completes_and_agrees_with_one_batch():
  # Unbounded, evaluate dispatched all 200 batches at once and XLA aborted the process.
  flags = os.environ.get('XLA_FLAGS', '') + (
      ' --xla_cpu_collective_call_warn_stuck_timeout_seconds=10'
      ' --xla_cpu_collective_call_terminate_timeout_seconds=10'
  )
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, '-c', _MANY_BATCHES],
      env={**os.environ, 'JAX_NUM_CPU_DEVICES': '8', 'XLA_FLAGS': flags, 'PYTHONPATH': repo},
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  whole, batched = json.loads(proc.stdout.splitlines()[-1])
  assert whole['top1'] == batched['top1'] and whole.keys() == batched.keys()
  for key in ('top5', 'nll', 'ece', 'aurc'):
    assert batched[key] == pytest.approx(whole[key], rel=1e-5), key
