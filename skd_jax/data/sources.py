"""Batch sources: every step's global batch, from the step number alone.

A source turns step ``s`` into a :data:`Batch`: the main examples and every extra group of
examples the loss terms asked for, each an :class:`Examples` of ``B`` slots (stable example
indices, validity, labels and augmented uint8 images), sharded along the ``data`` mesh axis. The
batch depends on ``(seed, s)`` only, so a resumed run sees exactly the batches an uninterrupted
run would. Groups (:data:`GROUPS`):

* ``'main'``: the epoch permutation (``skd_jax.data.samplers``), always present;
* ``'partner'``: for every main example one example of the same class (CS-KD);
* ``'previous'``: step ``s - 1``'s main examples, across epoch boundaries, invalid at step 0
  (DLB);
* ``'again'``: the main examples themselves, augmented again with an independent draw (DDGSD's
  second distortion of every image).

Each group is augmented with its own randomness, so a partner, a previous or an ``'again'`` example
is a new view even when it is the same image: ``'again'`` is a second, independent draw of the
training augmentation (crop offsets and flips) of each main example, from the same un-augmented
image, not an augmentation on top of the first draw. Normalisation is not the source's job: each
network normalises its own input (``skd_jax.networks``), so a teacher trained on other statistics
sees its own.

A source splits its work in two, so that the trainer can drive every source the same way::

  args = source.step_args(step)          # on the host, before the compiled step
  batch = source.batch(step, *args)      # inside the compiled step

:class:`OnDeviceSource` keeps the whole split on every device as uint8: ``step_args`` returns the
data and the epoch's permutation (computed once per epoch) and ``batch`` selects and augments
inside the compiled step, so there is no per-step host work. ``skd_jax.data.streaming.HostSource``
reads, decodes and augments on the host, each process its share, for data that does not fit on
the devices (``data.pipeline = 'host'``); its ``batch`` returns what ``step_args`` brought.
"""

import functools
from typing import Any

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import mesh as mesh_lib
from skd_jax.data import pipeline
from skd_jax.data import samplers

GROUPS = ('main', 'partner', 'previous', 'again')

# Fold-in constants of the run's PRNG key (skd_jax.state uses 0 for initialisation, 3 for terms).
_AUGMENT, _ORDER, _PARTNER_AUGMENT, _PARTNERS, _PREVIOUS_AUGMENT, _AGAIN_AUGMENT = 1, 2, 4, 5, 6, 7


class Examples(struct.PyTreeNode):
  """One group of a step's global batch, ``B`` slots sharded along ``data``.

  Attributes:
    index: ``[B]`` int32 stable indices into the training split.
    valid: ``[B]`` bool, False on padding slots (they carry real images but no loss weight).
    labels: ``[B]`` int32.
    images: ``[B, H, W, C]`` uint8, augmented.
  """

  index: jax.Array
  valid: jax.Array
  labels: jax.Array
  images: jax.Array


Batch = dict[str, Examples]  # group name -> its examples; always has 'main'


class DeviceData(struct.PyTreeNode):
  """A split on every device: uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``."""

  images: jax.Array
  labels: jax.Array


def to_devices(images: np.ndarray, labels: np.ndarray, mesh) -> DeviceData:
  # Every process loaded the whole split; the global array is the same data on every device.
  replicated = mesh_lib.replicated(mesh)
  put = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))
  return DeviceData(images=put(images), labels=put(labels.astype(np.int32)))


class DeviceEvalSet:
  """The test split on every device; batch ``b``'s arguments of ``skd_jax.evaluation.eval_step``."""

  def __init__(self, data: DeviceData, batch_size: int):
    self.data, self.batch_size = data, batch_size
    self.num_examples = data.labels.shape[0]
    self.num_batches = samplers.steps_per_epoch(self.num_examples, batch_size)

  def example_args(self):
    return self.data, np.int32(0)

  def batches(self):
    for b in range(self.num_batches):
      yield self.data, np.int32(b)


def run_key(seed: int, mesh) -> jax.Array:
  """The run's PRNG key ``jax.random.key(seed)``, replicated on ``mesh``.

  Made on the host and passed to the compiled programs as an argument, so that no program holds
  the seed: a run with another seed reuses every compiled program (and the persistent
  compilation cache). The key's data are those of ``jax.random.key(seed)`` inside a program.
  """
  data = np.asarray(jax.random.key_data(jax.random.key(seed)))
  replicated = mesh_lib.replicated(mesh)
  data = jax.make_array_from_process_local_data(replicated, data)
  return jax.jit(jax.random.wrap_key_data, out_shardings=replicated)(data)


def step_key(key: jax.Array, stream: int, step) -> jax.Array:
  """The PRNG key of ``stream`` at ``step``: ``fold_in(fold_in(key, stream), step)``, ``key``
  being the run's (:func:`run_key`)."""
  return jax.random.fold_in(jax.random.fold_in(key, stream), step)


class OnDeviceSource:
  """The whole training split on every device; selection and augmentation compiled.

  Args:
    images: ``[N, H, W, C]`` uint8 training images.
    labels: ``[N]`` integer labels in ``[0, num_classes)``.
    num_classes: number of classes.
    mesh: the ``data`` mesh.
    seed: the run's seed.
    batch_size: global batch size ``B``.
    groups: the groups to produce besides ``'main'`` (a subset of :data:`GROUPS`).
    crop_padding, flip: augmentation (``skd_jax.data.pipeline.augment``).
  """

  def __init__(
      self,
      images: np.ndarray,
      labels: np.ndarray,
      num_classes: int,
      mesh,
      *,
      seed: int,
      batch_size: int,
      groups=(),
      crop_padding: int = 0,
      flip: bool = False,
  ):
    unknown = set(groups) - set(GROUPS)
    if unknown:
      raise ValueError(f'groups: unknown {sorted(unknown)}; expected some of {GROUPS}')
    self.num_examples = len(labels)
    self.labels = np.asarray(labels)
    self.wait_seconds = 0.0  # the host never waits for data
    self.batch_size = batch_size
    self.steps_per_epoch = samplers.steps_per_epoch(self.num_examples, batch_size)
    self.groups = ('main',) + tuple(g for g in GROUPS[1:] if g in groups)
    self._mesh = mesh
    self.key = run_key(seed, mesh)
    self._augment = functools.partial(pipeline.augment, crop_padding=crop_padding, flip=flip)
    self.data = to_devices(images, labels, mesh)
    replicated = mesh_lib.replicated(mesh)
    self._classes = None
    if 'partner' in self.groups:
      classes = samplers.class_index(labels, num_classes)
      self._classes = samplers.ClassIndex(
          *(jax.make_array_from_process_local_data(replicated, x) for x in classes)
      )
    order = functools.partial(
        samplers.epoch_order, num_examples=self.num_examples, batch_size=batch_size
    )
    self._order_fn = jax.jit(
        lambda key, epoch: order(jax.random.fold_in(key, _ORDER), epoch),
        out_shardings=replicated,
    )
    self._orders = (None, None)  # (epoch, (its order, the previous epoch's order))

  def _epoch_orders(self, epoch: int):
    if self._orders[0] != epoch:
      order = self._order_fn(self.key, epoch)
      previous = order
      if 'previous' in self.groups and epoch > 0:
        previous = self._order_fn(self.key, epoch - 1)
      self._orders = (epoch, (order, previous))
    return self._orders[1]

  def close(self):
    """Nothing to stop: the data stays on the devices."""

  def step_args(self, step: int) -> tuple[Any, ...]:
    """What :meth:`batch` needs besides the step: the data, the epoch's orders, the class index
    and the run's key."""
    return self.data, self._epoch_orders(step // self.steps_per_epoch), self._classes, self.key

  def example_args(self) -> tuple[Any, ...]:
    """Arguments like :meth:`step_args`', for compiling ahead of time."""
    return self.step_args(0)

  def batch(self, step: jax.Array, data: DeviceData, orders, classes, key) -> Batch:
    """Step ``step``'s global batch (traceable: runs inside the compiled step)."""
    order, previous_order = orders
    spe = self.steps_per_epoch
    slots_of = functools.partial(
        samplers.batch_slots, num_examples=self.num_examples, batch_size=self.batch_size
    )
    index, valid = slots_of(order, step % spe)
    batch = {'main': self._examples(data, index, valid, step_key(key, _AUGMENT, step))}
    if 'partner' in self.groups:
      partners = samplers.class_partners(
          step_key(key, _PARTNERS, step), data.labels[index], classes
      )
      augment_key = step_key(key, _PARTNER_AUGMENT, step)
      batch['partner'] = self._examples(data, partners, valid, augment_key)
    if 'previous' in self.groups:
      # Step s - 1 lies in the previous epoch exactly when s starts an epoch.
      order = jnp.where(step % spe == 0, previous_order, order)
      index, valid = slots_of(order, (step - 1) % spe)
      augment_key = step_key(key, _PREVIOUS_AUGMENT, step)
      batch['previous'] = self._examples(data, index, valid & (step > 0), augment_key)
    if 'again' in self.groups:
      index, valid = batch['main'].index, batch['main'].valid
      batch['again'] = self._examples(data, index, valid, step_key(key, _AGAIN_AUGMENT, step))
    return batch

  def _examples(self, data: DeviceData, index, valid, key) -> Examples:
    sharded = mesh_lib.sharded(self._mesh)
    images = jax.lax.with_sharding_constraint(data.images[index], sharded)
    labels = jax.lax.with_sharding_constraint(data.labels[index], sharded)
    return Examples(index, valid, labels, self._augment(key, images))
