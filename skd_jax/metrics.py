"""Classification metrics as reported in the PS-KD paper.

Kim et al., "Self-Knowledge Distillation with Progressive Refinement of Targets", ICCV 2021; the
metric definitions follow the official code (lgcnsai/PS-KD-Pytorch, ``utils/metric.py``).

The module has two layers:

* `per_example_stats` is pure `jax.numpy`, jit-friendly, and runs on device inside the eval step.
  It reduces ``[B, C]`` logits to a few ``[B]`` float32 arrays, so that only O(B) values leave the
  device.
* The remaining functions run on the host with numpy (float64) over the statistics of the whole
  test set, because ECE and AURC need all examples at once (binning, a global sort).

Reporting conventions (the same units as the paper's tables):

* ``top1``, ``top5`` and ``ece`` are in percent (x100).
* ``aurc`` and ``eaurc`` are x1000.
* ``nll`` is the mean negative log-likelihood in nats, unscaled.

Callers drop padding rows (e.g. from a padded last batch) before calling the host functions.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# Keys of `per_example_stats` that `summarize` consumes.
_STAT_KEYS = ('confidence', 'correct', 'top5', 'nll')


def per_example_stats(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-example statistics for classification metrics.

  With ``p = softmax(z)`` for the logits ``z`` of one example with label ``y``:

  * ``confidence = max_c p_c``
  * ``correct = 1[argmax_c p_c == y]``
  * ``top5 = 1[y is among the k = min(5, C) largest logits]``
  * ``nll = -log_softmax(z)_y = logsumexp(z) - z_y``

  Everything is computed in float32 whatever the input dtype. Ties in the argmax / top-k are
  broken towards the lower class index, as by `jnp.argmax` and `jax.lax.top_k` (and by
  ``torch.argmax`` in the official code).

  Args:
    logits: float array of shape ``[B, C]``.
    labels: integer array of shape ``[B]`` with values in ``[0, C)``. An out-of-range label gives
      a NaN ``nll`` for that row (no check is possible under jit).

  Returns:
    A dict with float32 arrays of shape ``[B]`` under ``confidence``, ``correct``, ``top5`` and
    ``nll``.

  Raises:
    ValueError: if the shapes are not ``[B, C]`` and ``[B]`` (a static check, fine under jit).
  """
  if logits.ndim != 2:
    raise ValueError(f'logits: expected shape [B, C], got {logits.shape}')
  if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
    raise ValueError(f'labels: expected shape [{logits.shape[0]}], got {labels.shape}')
  num_classes = logits.shape[1]
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)

  # Confidence and correctness come from the softmax probabilities, as in the official code
  # (max and argmax of softmax(z)): a tie between probabilities that differ in the logits then
  # resolves as it does there.
  probs = jax.nn.softmax(logits, axis=-1)
  confidence = jnp.max(probs, axis=-1)
  correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
  # log_softmax subtracts the max before exponentiating, so the nll stays finite for large logits
  # where log(softmax(z)) would underflow to log(0).
  log_probs = jax.nn.log_softmax(logits, axis=-1)

  k = min(5, num_classes)
  _, top_idx = jax.lax.top_k(logits, k)
  top5 = jnp.any(top_idx == labels[:, None], axis=-1).astype(jnp.float32)

  # mode='fill' makes an out-of-range label produce NaN rather than silently clamping.
  label_log_prob = jnp.take_along_axis(
      log_probs, labels[:, None], axis=-1, mode='fill', fill_value=jnp.nan
  )[:, 0]
  nll = -label_log_prob

  return {'confidence': confidence, 'correct': correct, 'top5': top5, 'nll': nll}


def _as_1d_pair(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts a (confidence, correct) pair to float64 1-D arrays."""
  confidence = np.asarray(confidence, dtype=np.float64)
  correct = np.asarray(correct, dtype=np.float64)
  if confidence.ndim != 1:
    raise ValueError(f'confidence: expected a 1-D array, got shape {confidence.shape}')
  if correct.ndim != 1:
    raise ValueError(f'correct: expected a 1-D array, got shape {correct.shape}')
  if confidence.shape[0] != correct.shape[0]:
    raise ValueError(
        f'correct: expected the same length as confidence ({confidence.shape[0]}), '
        f'got {correct.shape[0]}'
    )
  if confidence.shape[0] == 0:
    raise ValueError('confidence: expected at least one example, got an empty array')
  return confidence, correct


def expected_calibration_error(confidence, correct, num_bins: int = 10) -> float:
  """Expected calibration error in percent, computed exactly as the official PS-KD code does.

  The official ``utils/metric.py`` converts each float32 confidence to a Python float (the
  float64 of exactly that value), builds the bins' upper edges with
  ``np.arange(w, 1 + w, w)`` for the width ``w = 1 / M`` and their lower edges as ``upper - w``,
  both in float64, and puts an example in a bin when ``lower < c <= upper``. With ``n_k``
  examples in bin ``k``, ``acc_k`` their accuracy and ``conf_k`` their mean confidence (a
  sequential sum, divided by ``n_k``)::

    ECE = 100 * sum_k |acc_k - conf_k| * n_k / N

  where ``N`` counts every example. The float64 edges are not exactly ``k / M``. For ``M = 10``
  the third bin is ``(0.20000000000000004, 0.30000000000000004]``, so

  * a confidence of exactly 0.20000000000000004 (or 0.7000000000000001, ...) is in no bin, yet
    counts in ``N``;
  * float32 0.3 (0.30000001192...) falls in ``(0.30000000000000004, 0.4]``;
  * a confidence of 0 is in no bin either (the first bin is ``(0, 0.1]``).

  We reproduce these edge cases rather than "fix" them, so that our ECE equals the numbers the
  PS-KD paper reports by the same code, bit for bit given the same confidences.

  Args:
    confidence: 1-D array of max softmax probabilities (float32 from the model, or float64).
    correct: 1-D array of 0/1 correctness indicators, same length.
    num_bins: number of bins ``M``.

  Returns:
    ECE x100 as a Python float.

  Raises:
    ValueError: on non-1-D or mismatched inputs, an empty set, or ``num_bins < 1``.
  """
  confidence, correct = _as_1d_pair(confidence, correct)  # float64: exact for float32 input
  total = confidence.shape[0]
  weighted_gaps = [
      abs(accuracy - mean_confidence) * count if count else 0
      for count, mean_confidence, accuracy in _bins(confidence, correct, num_bins)
  ]
  return float(100 * sum(weighted_gaps) / total)


def _bins(confidence: np.ndarray, correct: np.ndarray, num_bins: int) -> list[tuple]:
  """``(count, mean confidence, accuracy)`` of every bin of `expected_calibration_error`, in the
  official code's bins and arithmetic; ``(0, 0.0, 0.0)`` for an empty bin."""
  if num_bins < 1:
    raise ValueError(f'num_bins: expected a positive integer, got {num_bins}')
  width = 1.0 / num_bins
  bins = []
  for upper in np.arange(width, 1 + width, width):
    lower = upper - width
    in_bin = (confidence > lower) & (confidence <= upper)
    count = int(np.sum(in_bin))
    if count == 0:
      bins.append((0, 0.0, 0.0))
      continue
    accuracy = float(int(np.sum(correct[in_bin]))) / count
    mean_confidence = sum(confidence[in_bin].tolist()) / count  # Python's sum: the same order
    bins.append((count, mean_confidence, accuracy))
  return bins


def reliability_bins(confidence, correct, num_bins: int = 10) -> dict[str, list]:
  """The bins of `expected_calibration_error`, for a reliability diagram.

  The same bins (the official code's float64 edges, an example in bin ``k`` when
  ``lower_k < c <= upper_k``; a confidence of 0 or exactly on a rounded edge is in no bin) and the
  same arithmetic, so that with ``N`` the number of examples::

    ECE = 100 * sum_k count_k * |accuracy_k - confidence_k| / N

  holds exactly. For ``num_bins = 10`` there are 10 bins; the official edges
  (``np.arange(w, 1 + w, w)``) give one more for a few sizes, such as 49.

  Args:
    confidence: 1-D array of max softmax probabilities.
    correct: 1-D array of 0/1 correctness indicators, same length.
    num_bins: number of bins ``M``.

  Returns:
    ``{'count': [int], 'confidence': [float], 'accuracy': [float]}``, one entry per bin from the
    lowest confidences: the number of examples, their mean confidence and their accuracy (both
    in ``[0, 1]``, 0 for an empty bin).

  Raises:
    ValueError: on non-1-D or mismatched inputs, an empty set, or ``num_bins < 1``.

  >>> bins = reliability_bins([0.95, 0.9, 0.55, 0.35], [1, 0, 1, 1], num_bins=4)
  >>> bins['count'], bins['accuracy']
  ([0, 1, 1, 2], [0.0, 1.0, 1.0, 0.5])
  >>> [round(c, 3) for c in bins['confidence']]
  [0.0, 0.35, 0.55, 0.925]
  """
  confidence, correct = _as_1d_pair(confidence, correct)
  counts, confidences, accuracies = zip(*_bins(confidence, correct, num_bins))
  return {'count': list(counts), 'confidence': list(confidences), 'accuracy': list(accuracies)}


def _aurc_raw(confidence: np.ndarray, correct: np.ndarray) -> float:
  """Unscaled AURC of validated float64 arrays, in the official code's order of operations."""
  # The official order: numpy's default (unstable) argsort of the float64 confidences, reversed.
  order = np.argsort(confidence)[::-1]
  errors = (correct[order] == 0).astype(np.float64)
  risks = np.cumsum(errors) / np.arange(1, errors.shape[0] + 1)
  return float(np.mean(risks))


def _aurc_opt_raw(num_examples: int, num_errors: int) -> float:
  """Unscaled AURC of the ideal ranking that puts all ``num_errors`` errors last."""
  n, r = num_examples, num_errors
  j = np.arange(1, r + 1).astype(np.float64)
  return float((1.0 / n) * np.sum(j / (n - r + j)))


def aurc(confidence, correct) -> float:
  """Area under the risk-coverage curve, x1000.

  Examples are sorted by confidence, descending, as the official code sorts them: numpy's
  default ``argsort`` (ascending, not stable) reversed, so tied examples come in the reverse of
  the order that sort gives them. With ``e_i`` the error indicator ``1 - correct`` of the
  ``i``-th example in that order, the selective risk at coverage ``k`` is
  ``R_k = (1 / k) * sum_{i<=k} e_i``, and::

    AURC = 1000 * (1 / N) * sum_{k=1..N} R_k

  Args:
    confidence: 1-D array of confidence scores (higher means more confident).
    correct: 1-D array of 0/1 correctness indicators, same length.

  Returns:
    AURC x1000 as a Python float.

  Raises:
    ValueError: on non-1-D or mismatched inputs or an empty set.
  """
  confidence, correct = _as_1d_pair(confidence, correct)
  return 1000.0 * _aurc_raw(confidence, correct)


def eaurc(confidence, correct) -> float:
  """Excess AURC over the best achievable ranking, x1000.

  With ``N`` examples of which ``r`` are errors, the optimal ranking puts every error last, so its
  risk is 0 for ``k <= N - r`` and ``j / (N - r + j)`` at ``k = N - r + j``::

    AURC_opt = (1 / N) * sum_{j=1..r} j / (N - r + j)
    E-AURC = 1000 * (AURC - AURC_opt)

  Both terms are 0 when there are no errors.

  Args:
    confidence: 1-D array of confidence scores (higher means more confident).
    correct: 1-D array of 0/1 correctness indicators, same length.

  Returns:
    E-AURC x1000 as a Python float.

  Raises:
    ValueError: on non-1-D or mismatched inputs or an empty set.
  """
  confidence, correct = _as_1d_pair(confidence, correct)
  n = confidence.shape[0]
  # Rounded because `correct` is stored as float; it is a 0/1 indicator, so this is exact.
  num_errors = int(round(n - np.sum(correct)))
  return 1000.0 * (_aurc_raw(confidence, correct) - _aurc_opt_raw(n, num_errors))


def summarize(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
  """Reduces the concatenated `per_example_stats` of a whole test set to the paper's metrics.

  Args:
    stats: mapping with 1-D arrays of equal length ``N > 0`` under ``confidence``, ``correct``,
      ``top5`` and ``nll`` (other keys are ignored). Padding rows must already be removed.

  Returns:
    Python floats under exactly these keys:

    * ``top1``: ``100 * mean(correct)``
    * ``top5``: ``100 * mean(top5)``
    * ``nll``: ``mean(nll)``
    * ``ece``: `expected_calibration_error` with 10 bins (percent)
    * ``aurc``: `aurc` (x1000)
    * ``eaurc``: `eaurc` (x1000)

  Raises:
    ValueError: if a key is missing or the arrays are not 1-D, of equal length and non-empty.
  """
  missing = [key for key in _STAT_KEYS if key not in stats]
  if missing:
    raise ValueError(f'stats: expected keys {list(_STAT_KEYS)}, missing {missing}')
  arrays = {key: np.asarray(stats[key], dtype=np.float64) for key in _STAT_KEYS}
  n = arrays['confidence'].shape[0] if arrays['confidence'].ndim == 1 else None
  for key, value in arrays.items():
    if value.ndim != 1:
      raise ValueError(f'stats[{key!r}]: expected a 1-D array, got shape {value.shape}')
    if value.shape[0] != n:
      raise ValueError(
          f'stats[{key!r}]: expected the same length as confidence ({n}), got {value.shape[0]}'
      )
  if n == 0:
    raise ValueError('stats: expected at least one example, got empty arrays')

  confidence, correct = arrays['confidence'], arrays['correct']
  return {
      'top1': float(100.0 * np.mean(correct)),
      'top5': float(100.0 * np.mean(arrays['top5'])),
      'nll': float(np.mean(arrays['nll'])),
      'ece': expected_calibration_error(confidence, correct, num_bins=10),
      'aurc': aurc(confidence, correct),
      'eaurc': eaurc(confidence, correct),
  }
