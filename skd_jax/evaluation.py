"""Evaluation on the test split: the PS-KD paper's metrics of any backbone's variables.

The test split comes in fixed-size batches (the last one padded and masked) from one of two sets:
:class:`~skd_jax.data.sources.DeviceEvalSet`, the split on every device as uint8,
whose compiled :func:`eval_step` selects batch ``b`` itself; or, with the host pipeline,
``skd_jax.data.streaming.HostEvalSet``, which reads every batch on the host, each process its
share, for :func:`eval_batch`. Either gives per-example statistics that :func:`evaluate` reduces
on the host in float64 (``skd_jax.metrics``), so both give the same metrics on the same images.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import mesh as mesh_lib
from skd_jax import metrics as metrics_lib
from skd_jax.data import sources


def eval_step(variables, test, batch: jax.Array, *, networks, mesh, batch_size: int):
  """Per-example statistics of test batch ``batch`` (``valid`` marks the real examples).

  ``variables`` are a backbone's (``Networks.inference`` of the student, or its EMA copy), so
  training-only heads play no part in evaluation.
  """
  num_examples = test.labels.shape[0]
  position = batch * batch_size + jnp.arange(batch_size)
  valid = position < num_examples
  index = jax.lax.with_sharding_constraint(
      jnp.minimum(position, num_examples - 1), mesh_lib.sharded(mesh)
  )
  logits, _ = networks.apply_inference(variables, test.images[index])
  return {**metrics_lib.per_example_stats(logits, test.labels[index]), 'valid': valid}


def eval_batch(variables, examples: sources.Examples, *, networks):
  """Per-example statistics of a batch read on the host (``HostEvalSet``), as :func:`eval_step`."""
  logits, _ = networks.apply_inference(variables, examples.images)
  return {**metrics_lib.per_example_stats(logits, examples.labels), 'valid': examples.valid}


def eval_function(test, networks, mesh):
  """The function to compile for ``test``'s batches: (variables, *a batch's arguments) ->
  per-example statistics; :func:`eval_step` for a ``DeviceEvalSet``, :func:`eval_batch`
  for a ``HostEvalSet`` (its batches come sharded)."""
  if isinstance(test, sources.DeviceEvalSet):
    return functools.partial(eval_step, networks=networks, mesh=mesh, batch_size=test.batch_size)
  return functools.partial(eval_batch, networks=networks)


def evaluate(eval_fn, test, models: dict[str, object]) -> dict[str, float]:
  """The metrics of every model in ``models`` (key prefix -> variables), prefixed, in one dict.

  Every model gets the scalars of ``skd_jax.metrics.summarize`` and, under ``reliability``, the
  10 bins of its ECE (``skd_jax.metrics.reliability_bins``: a dict of lists, for reliability
  diagrams). ``test`` is a ``DeviceEvalSet`` or a ``HostEvalSet``; each batch is read once
  for all models.
  """
  stats = {prefix: [] for prefix in models}
  in_flight = mesh_lib.InFlight()  # 100 batches dispatched at once deadlock XLA's CPU collectives
  for args in test.batches():
    for prefix, variables in models.items():
      stats[prefix].append(eval_fn(variables, *args))
      in_flight.add(stats[prefix][-1])
  result = {}
  for prefix, batches in stats.items():
    batches = jax.device_get(batches)
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    valid = merged.pop('valid')
    kept = {k: v[valid] for k, v in merged.items()}
    summary = metrics_lib.summarize(kept)
    summary['reliability'] = metrics_lib.reliability_bins(kept['confidence'], kept['correct'])
    result.update({prefix + k: v for k, v in summary.items()})
  return result


_SUMMARY_KEYS = ('top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc')


def summary(result, records, *, num_epochs: int, num_steps: int) -> dict:
  """A run's ``summary.json``: the final evaluation ``result`` (the student's metrics, its EMA
  copy's, ``train_seconds``) with the best top-1 and its epoch over the eval ``records`` of
  ``metrics.jsonl`` (the final result itself when there are none)."""
  evals = [r for r in records if r['kind'] == 'eval'] or [{**result, 'epoch': num_epochs}]
  best = max(evals, key=lambda r: r['top1'])
  keys = _SUMMARY_KEYS + tuple(f'ema/{k}' for k in _SUMMARY_KEYS) + ('train_seconds',)
  return {
      **{k: result[k] for k in keys if k in result},
      'best_top1': best['top1'],
      'best_epoch': int(best['epoch']),
      'epochs': num_epochs,
      'steps': num_steps,
  }
