"""The device mesh of a run and the two ways an array is laid out on it.

The mesh has one axis, :data:`AXIS`. Parameters, optimizer and BatchNorm state are
:func:`replicated`; batches and per-example rows are :func:`sharded` along the axis by example.
"""

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D :data:`AXIS` mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: Explicit ones (the default) break Linen modules that do not annotate shardings.
  return jax.make_mesh(
      (len(devices),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """The leading (example) dimension split along :data:`AXIS`, the rest whole."""
  return NamedSharding(mesh, P(AXIS))
