"""Evaluation on the test split: the PS-KD paper's metrics of any backbone's variables.

The test split lives on every device as uint8 (``skd_jax.data.sources.DeviceData``); each
compiled :func:`eval_step` computes per-example statistics of one fixed-size batch (the last one
padded and masked), and :func:`evaluate` reduces them on the host in float64
(``skd_jax.metrics``).
"""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from skd_jax import example_rows
from skd_jax import metrics as metrics_lib
from skd_jax.data import samplers


def eval_step(variables, test, batch: jax.Array, *, networks, mesh, batch_size: int):
  """Per-example statistics of test batch ``batch`` (``valid`` marks the real examples).

  ``variables`` are a backbone's (``Networks.inference`` of the student, or its EMA copy), so
  training-only heads play no part in evaluation.
  """
  num_examples = test.labels.shape[0]
  position = batch * batch_size + jnp.arange(batch_size)
  valid = position < num_examples
  index = jax.lax.with_sharding_constraint(
      jnp.minimum(position, num_examples - 1), NamedSharding(mesh, P(example_rows.AXIS))
  )
  logits, _ = networks.apply_inference(variables, test.images[index])
  return {**metrics_lib.per_example_stats(logits, test.labels[index]), 'valid': valid}


def evaluate(eval_fn, test, models: dict[str, object], batch_size: int) -> dict[str, float]:
  """The metrics of every model in ``models`` (key prefix -> variables), prefixed, in one dict."""
  result = {}
  num_batches = samplers.steps_per_epoch(test.labels.shape[0], batch_size)
  for prefix, variables in models.items():
    stats = jax.device_get([eval_fn(variables, test, np.int32(b)) for b in range(num_batches)])
    merged = {k: np.concatenate([b[k] for b in stats]) for k in stats[0]}
    valid = merged.pop('valid')
    summary = metrics_lib.summarize({k: v[valid] for k, v in merged.items()})
    result.update({prefix + k: v for k, v in summary.items()})
  return result
