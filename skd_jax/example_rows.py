"""Per-example state tables (``[N, ...]``) sharded along examples over the ``data`` mesh axis.

Every function takes a pytree of tables (e.g. PS-KD's top-k history, ``{'indices': [N, k],
'values': [N, k]}``); each table is handled on its own with the same index vector.

Device ``d`` of ``D`` owns the contiguous rows ``[d * N_d, (d + 1) * N_d)``, where the table is
padded to ``N_d * D`` rows. A training batch's examples are spread over all devices, so each step
moves only the batch's rows:

* :func:`gather` -- every device looks up the rows it owns for the whole (replicated) index
  vector, zeros elsewhere; a reduce-scatter sums the contributions and leaves each device its own
  slice of the batch. ``B x ...`` values cross the interconnect, never the table.
* :func:`scatter` -- the batch's new rows are all-gathered (``B x ...``) and each device writes
  the ones it owns. Slots with ``keep = False`` (padding) are dropped, and of several slots with
  the same index only the last is written, so the result is deterministic and no row is ever a
  mixture.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from skd_jax.mesh import AXIS


def padded_rows(num_examples: int, mesh: Mesh) -> int:
  """Number of table rows: ``num_examples`` rounded up to a multiple of the device count."""
  devices = mesh.shape[AXIS]
  return math.ceil(num_examples / devices) * devices


def last_occurrence(index: jax.Array) -> jax.Array:
  """``[B]`` bool: True where no later slot holds the same index."""
  order = jnp.argsort(index, stable=True)
  ranked = index[order]
  last_in_run = jnp.concatenate([ranked[1:] != ranked[:-1], jnp.array([True])])
  return jnp.zeros_like(last_in_run).at[order].set(last_in_run)


def _local(index, rows_per_device):
  local = index - jax.lax.axis_index(AXIS) * rows_per_device
  return local, (local >= 0) & (local < rows_per_device)


def gather(tables, index: jax.Array, mesh: Mesh):
  """Rows ``table[index]`` of each table in the pytree ``tables`` (``index`` replicated).

  Returns the pytree of batch-sharded ``[B, ...]`` rows.
  """

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(AXIS), P()), out_specs=P(AXIS))
  def lookup(local_table, index):
    local, owned = _local(index, local_table.shape[0])
    rows = local_table[jnp.clip(local, 0, local_table.shape[0] - 1)]
    rows = jnp.where(owned.reshape(owned.shape + (1,) * (rows.ndim - 1)), rows, 0)
    return jax.lax.psum_scatter(rows, AXIS, scatter_dimension=0, tiled=True)

  return jax.tree.map(lambda table: lookup(table, index), tables)


def scatter(tables, index: jax.Array, values, keep: jax.Array, mesh: Mesh):
  """``tables`` with ``table[index[i]] = values[i]`` for kept, last-occurring slots ``i``.

  ``values`` is a pytree of ``[B, ...]`` arrays with the structure of the pytree ``tables``.
  """
  keep = keep & last_occurrence(index)

  @functools.partial(
      jax.shard_map, mesh=mesh, in_specs=(P(AXIS), P(), P(AXIS), P()), out_specs=P(AXIS)
  )
  def write(local_table, index, local_values, keep):
    values = jax.lax.all_gather(local_values, AXIS, tiled=True)
    local, owned = _local(index, local_table.shape[0])
    target = jnp.where(owned & keep, local, local_table.shape[0])  # out of range: dropped
    return local_table.at[target].set(values.astype(local_table.dtype), mode='drop')

  return jax.tree.map(lambda table, v: write(table, index, v, keep), tables, values)
