"""The device mesh of a run and the two ways an array is laid out on it.

The mesh has one axis, :data:`AXIS`. Parameters, optimizer and BatchNorm state are
:func:`replicated`; batches and per-example rows are :func:`sharded` along the axis by example.
"""

import os
from typing import Sequence

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


def cpu_devices(batch_sizes: Sequence[int], cpus: int | None = None) -> int:
  """How many CPU devices a single-process command-line run makes: one per CPU this process may
  run on (``cpus``, default its CPU affinity), lowered to the largest count that divides every
  batch size in ``batch_sizes``.

  XLA's CPU backend spreads one convolution over several threads poorly; ``k`` devices, each
  running its share of the batch, keep ``k`` CPUs busy (on a 2-core CPU two devices make the
  quick small ResNet's step 1.3-1.4x and CIFAR ResNet-18's 1.9x faster than one; README
  "Throughput"; more cores were not measured). The batch is split along :data:`AXIS` as on any
  mesh, and BatchNorm's statistics stay those of the global batch, so only the order of the sums
  changes.

  >>> cpu_devices([128, 1000], cpus=8)
  8
  >>> cpu_devices([128, 100], cpus=8)
  4
  """
  cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
  return max(d for d in range(1, max(cpus, 1) + 1) if all(b % d == 0 for b in batch_sizes))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """The leading (example) dimension split along :data:`AXIS`, the rest whole."""
  return NamedSharding(mesh, P(AXIS))
