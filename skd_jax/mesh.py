"""The device mesh of a run, the two ways an array is laid out on it, and how far ahead of its
devices the host may run.

The mesh has one axis, :data:`AXIS`. Parameters, optimizer and BatchNorm state are
:func:`replicated`; batches and per-example rows are :func:`sharded` along the axis by example.
The loops that dispatch compiled programs (training steps, evaluation batches) keep at most
:data:`MAX_IN_FLIGHT` of them unfinished (:class:`InFlight`).
"""

import collections
import os
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'

# XLA's CPU client lets 32 computations per device be dispatched and unfinished; the next one waits
# in dispatch. With several CPU devices, programs with collectives dispatched well past that limit
# deadlock: a rendezvous waits for a device's share that is never launched, until XLA aborts the
# process ("Termination timeout for all gather", a minute later). Measured on 2 CPUs: 64 or 100
# evaluation batches in flight (2 devices, and 8) aborted; at most 32 never did. 8 keeps every
# device busy (evaluation and training are as fast as unbounded), far below the limit.
MAX_IN_FLIGHT = 8


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


class InFlight:
  """Keeps at most ``limit`` dispatched programs unfinished: adding one more waits for the oldest.

  Waiting changes no result, only how far the host runs ahead of the devices (see
  :data:`MAX_IN_FLIGHT` for why it must not run far).
  """

  def __init__(self, limit: int = MAX_IN_FLIGHT):
    self.limit = limit
    self._outputs = collections.deque()

  def add(self, outputs) -> None:
    """Records a dispatched program's ``outputs`` (any pytree of its arrays)."""
    self._outputs.append(outputs)
    while len(self._outputs) > self.limit:
      jax.block_until_ready(self._outputs.popleft())
