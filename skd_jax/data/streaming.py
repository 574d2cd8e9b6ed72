"""The host-streaming batch source, for data that does not fit on the devices.

Batches are a pure function of the step, as with the on-device source (``skd_jax.data.sources``):
step ``s`` takes slots ``[s B, (s + 1) B)`` of its epoch's permutation, drawn on the host from
``(seed, epoch)``; partners and previous-step examples follow the same rules. Each of ``P``
processes computes the whole step's indices (cheap) but reads, decodes and augments only its
share, the global slots ``[p B / P, (p + 1) B / P)``, and contributes them to the global batch
(``jax.make_array_from_process_local_data``), so every example keeps its stable index and the
devices see one global batch sharded along ``data``.

The work runs in a grain pipeline over step numbers: ``data.workers`` host processes (0: threads
of the training process) read and augment whole steps ahead, ``data.prefetch`` of them buffered,
in order. Because a step's batch depends on the step alone, the source's position is the step: a
resumed run restarts the pipeline at the checkpoint's step and repeats or skips no example.

The trainer never waits for input without a bound: a batch is fetched in a thread and waited for
in slices of 0.1 s, so a signal stops the wait at once (single process), and a worker that delivers
nothing for ``data.timeout_seconds`` (ten times that for its first batch, which includes its
start-up) or dies ends the run with one line naming it (:class:`skd_jax.errors.InputError`).
Worker processes ignore the signals the trainer handles, exit when the trainer dies, even by
SIGKILL, and are named ``skd-input-I`` (what ``ps`` and ``top`` show, on Linux).

Augmentation draws the whole global batch's random numbers from ``(seed, group, step)`` with
numpy and keeps its share's, so the result does not depend on the number of processes. With
``augment='cifar'`` it is the on-device source's augmentation (random crop after zero padding,
horizontal flip) with numpy's generator instead of JAX's, so the two sources see the same
distribution of batches, not the same batches. With ``augment='imagenet'`` images may have any
size and become random-resized crops of ``image_size`` pixels, flipped
(``skd_jax.data.resized_crops``).

:class:`HostEvalSet` streams the test split for evaluation the same way: batch ``b`` is slots
``[b B, (b + 1) B)`` of the split in index order, the last one padded with the last example and
marked invalid, each process reading its share (resized and centre-cropped with
``augment='imagenet'``).
"""

import ctypes
import functools
import gc
import multiprocessing
from multiprocessing import resource_tracker
from multiprocessing import shared_memory
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time

from absl import flags
import grain
from grain import python as grain_python
import jax
import numpy as np

from skd_jax import data as data_lib
from skd_jax import mesh as mesh_lib
from skd_jax import preemption
from skd_jax.data import pipeline
from skd_jax.data import resized_crops
from skd_jax.data import samplers
from skd_jax.data import selection
from skd_jax.data import sources
from skd_jax.errors import ConfigError, InputError, Interrupted

# Random streams of (seed, stream, step), as the on-device source's fold-in constants.
_STREAMS = {'main': 1, 'order': 2, 'partner': 4, 'partners': 5, 'previous': 6, 'again': 7}


# A worker's process name (/proc/PID/comm): how the trainer tells its workers apart by index.
_WORKER_NAME = 'skd-input-{}'
_PR_SET_NAME = 15  # prctl option, <linux/prctl.h>
_POLL_SECONDS = 0.1  # a wait for input looks for a signal and its deadline this often
_ORPHAN_POLL_SECONDS = 0.5  # a worker checks that its trainer lives this often
_START_FACTOR = 10  # a worker's first batch, start-up included, may take this many timeouts
_CLOSE_GRACE_SECONDS = 1.0  # workers of a cut-short wait get this long to stop before SIGKILL
# The POSIX shared memory a trainer's workers create (/dev/shm/skd<trainer pid>_<random>): what a
# worker that died mid-batch leaves is found by name (HostSource.close).
_SEGMENT_PREFIX = 'skd{}_'


def _worker_init(trainer: int, index: int, count: int):
  """Runs first in every grain worker process: names it and binds its life to the trainer's.

  The trainer handles SIGTERM, SIGINT and SIGHUP (``skd_jax.preemption``) and then closes its
  workers, so a signal sent to the whole process group (Ctrl-C, a scheduler) must not kill them
  first. SIGKILL of the trainer leaves it no time to close them: a worker would then block forever
  on its full queue, so it exits once its parent is no longer ``trainer``.
  """
  del count
  for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None).prctl(_PR_SET_NAME, _WORKER_NAME.format(index).encode(), 0, 0, 0)
  threading.Thread(target=_exit_without, args=(trainer,), daemon=True).start()
  # grain puts batches in segments named by multiprocessing's private _make_filename.
  prefix = '/' + _SEGMENT_PREFIX.format(trainer)
  shared_memory._make_filename = lambda: prefix + secrets.token_hex(8)  # pylint: disable=protected-access


def _exit_without(trainer: int):
  while os.getppid() == trainer:
    time.sleep(_ORPHAN_POLL_SECONDS)
  os._exit(1)  # pylint: disable=protected-access  # nothing of this process is worth a clean exit


def _workers() -> dict[int, multiprocessing.Process]:
  """This process's live grain workers by index, from the names :func:`_worker_init` gave them."""
  found = {}
  for child in multiprocessing.active_children():
    try:
      with open(f'/proc/{child.pid}/comm') as f:
        name = f.read().strip()
    except OSError:  # not Linux, or the child just exited
      continue
    index = re.fullmatch(_WORKER_NAME.format(r'(\d+)'), name)
    if index:
      found[int(index.group(1))] = child
  return found


def _fetch(iterator, requests: queue.Queue, results: queue.Queue):
  """A thread's loop: for every true request, ``(next batch, None)`` or ``(None, the error)``."""
  while requests.get():
    try:
      batch = next(iterator)
    except Exception as e:  # pylint: disable=broad-exception-caught  # the waiting thread raises it
      results.put((None, e))
      continue
    results.put((batch, None))
    del batch  # its segments are freed when the waiting thread drops it, not at the next request


def _unlink_orphans() -> None:
  """Frees the segments of this process's workers that no array of this process maps.

  Called once the workers are gone and every batch this process dropped has been freed: what is
  left and unmapped belongs to nobody. A worker killed while it held a batch (blocked on its full
  queue, or stopped and then killed) leaves the batch's segments behind, and grain's free of a
  received batch can fail before it unlinks (``SharedMemory.close`` raised ``OSError: [Errno 9] Bad
  file descriptor`` in about one run in eight); the resource tracker would free either at exit
  with a warning of leaked objects. A segment still mapped here is a live batch's, grain's to free.
  """
  prefix = _SEGMENT_PREFIX.format(os.getpid())
  try:
    names = {n for n in os.listdir('/dev/shm') if n.startswith(prefix)}
    with open('/proc/self/maps') as f:
      mapped = set(re.findall(r' /dev/shm/(\S+)', f.read()))
  except OSError:  # no /dev/shm or /proc: not Linux
    return
  for name in names - mapped:
    # Unlinked by path, not mapped: a worker killed between creating a segment and sizing it
    # leaves an empty one, which SharedMemory cannot open. The tracker may not know the name yet
    # (the worker registers after sizing): registering first keeps its books balanced.
    resource_tracker.register('/' + name, 'shared_memory')
    try:
      os.unlink(os.path.join('/dev/shm', name))
    except FileNotFoundError:
      pass
    resource_tracker.unregister('/' + name, 'shared_memory')


def _finish_frees() -> None:
  """Waits until the segments of batches already dropped are freed.

  grain frees a received batch's segments on one background thread of a ``multiprocessing``
  pool, which drops whatever it has not yet run when the interpreter exits: a run that stops
  right after closing its pipeline would leave those segments to the resource tracker. The pool
  runs its tasks in order, so an empty task's completion means every earlier free is done.
  """
  frees = getattr(grain_python.SharedMemoryArray, '_del_thread_pool', None)
  if frees is not None:
    frees.apply(lambda: None)


def _signalled() -> bool:
  # Several processes must stop at one step (skd_jax.preemption): none of them leaves a wait alone.
  return jax.process_count() == 1 and preemption.received() is not None


def _rng(seed: int, stream: str, number: int) -> np.random.Generator:
  return np.random.default_rng((seed, _STREAMS[stream], number))


def _share(batch_size: int) -> slice:
  """This process's slots of a global batch."""
  per_process = batch_size // jax.process_count()
  return slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def eval_transform(augment: str, image_size: int, eval_resize: int):
  """The evaluation transform of a list or array of images: none with ``'cifar'``; resize of
  the shorter side to ``eval_resize`` and a centre crop of ``image_size`` with ``'imagenet'``."""
  if augment != 'imagenet':
    return np.asarray
  return lambda images: np.stack(
      [resized_crops.resize_centre_crop(x, eval_resize, image_size) for x in images]
  )


def open_splits(data_config, mesh, eval_batch_size: int):
  """The training records, the streamed test set, the model's input shape and the normalisation.

  Returns:
    ``(train records, HostEvalSet, (H, W, C), (mean, std))``. The training records are the
    subset with the noisy labels when ``data.train_examples`` or ``data.label_noise`` ask for
    them (``skd_jax.data.selection``). The mean and std are those of an evenly spaced sample of
    those training images as the model sees them at evaluation: 10,000, or 1,000 with
    ``'imagenet'`` augmentation (large images to decode).
  """
  augment, size = data_config.augment, data_config.image_size
  train_set = data_lib.open_records(data_config, data_config.train_split)
  train_set = selection.select_records(data_config, train_set)  # data.train_examples, ...
  transform = eval_transform(augment, size, data_config.eval_resize)
  count = 1_000 if augment == 'imagenet' else 10_000
  sample = np.linspace(0, len(train_set) - 1, min(len(train_set), count)).astype(np.int64)
  stats = pipeline.channel_stats(transform(train_set.read(sample)[0]))
  test = HostEvalSet(
      data_lib.open_records(data_config, data_config.test_split),
      mesh,
      batch_size=eval_batch_size,
      transform=transform,
  )
  shape = tuple(train_set.image_shape)
  if augment == 'imagenet':
    shape = (size, size, shape[-1])
  return train_set, test, shape, stats


def augment(
    rng: np.random.Generator, images: np.ndarray, share: slice, size: int, crop_padding, flip
) -> np.ndarray:
  """Random crop after zero padding and random flip of ``images``, the ``share`` of a batch of
  ``size``: the random numbers are drawn for the whole batch and sliced."""
  _, height, width, _ = images.shape
  offsets = rng.integers(0, 2 * crop_padding + 1, (size, 2))[share]
  flips = (rng.random(size) < 0.5)[share]
  if crop_padding:
    p = crop_padding
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    images = np.stack(
        [padded[i, y : y + height, x : x + width] for i, (y, x) in enumerate(offsets)]
    )
  if flip:
    images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


class StepReader:
  """What a host worker runs: step -> this process's share of the step's groups, as numpy.

  Picklable (records, sampler state and settings only), so grain can ship it to worker processes.
  """

  def __init__(
      self,
      records,
      *,
      seed,
      batch_size,
      groups,
      crop_padding,
      flip,
      share,
      augment='cifar',
      image_size=224,
  ):
    self.records, self.seed, self.batch_size, self.groups = records, seed, batch_size, groups
    self.crop_padding, self.flip, self.share = crop_padding, flip, share
    self.augment, self.image_size = augment, image_size
    self.num_examples = len(records)
    self.steps_per_epoch = samplers.steps_per_epoch(self.num_examples, batch_size)
    self.classes = None
    if 'partner' in groups:
      self.classes = samplers.class_index(records.labels, records.num_classes)
    self._orders = {}

  def _order(self, epoch: int) -> np.ndarray:
    # Worker threads call this concurrently: read the cache once, replace it whole, and return
    # the local result, so another thread's epoch never replaces ours between check and use.
    order = self._orders.get(epoch)
    if order is None:
      perm = _rng(self.seed, 'order', epoch).permutation(self.num_examples)
      slots = np.arange(self.steps_per_epoch * self.batch_size) % self.num_examples
      order = perm[slots].astype(np.int32)
      self._orders = {epoch: order}  # one epoch at a time
    return order

  def _slots(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    epoch, position = divmod(step, self.steps_per_epoch)
    start = position * self.batch_size
    index = self._order(epoch)[start : start + self.batch_size]
    return index, start + np.arange(self.batch_size) < self.num_examples

  def indices(self, step: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every group's global example indices and validity at ``step``."""
    index, valid = self._slots(step)
    groups = {'main': (index, valid)}
    if 'partner' in self.groups:
      by_class, start, count = self.classes
      labels = self.records.labels[index]
      offset = _rng(self.seed, 'partners', step).integers(0, count[labels])
      groups['partner'] = (by_class[start[labels] + offset], valid)
    if 'previous' in self.groups:
      previous, previous_valid = self._slots(max(step - 1, 0))
      groups['previous'] = (previous, previous_valid & (step > 0))
    if 'again' in self.groups:  # the same examples, augmented with the 'again' stream
      groups['again'] = (index, valid)
    return groups

  def __call__(self, step: int) -> dict:
    out, read = {'step': step}, {}
    for group, (index, valid) in self.indices(step).items():
      if group == 'again':  # the main examples' images, read once, augmented again
        images, labels = read['main']
      else:
        images, labels = read[group] = self.records.read(index[self.share])
      rng = _rng(self.seed, group, step)
      if self.augment == 'imagenet':
        images = resized_crops.random_resized_crops(
            rng, images, self.share, self.batch_size, self.image_size, self.flip
        )
      else:
        images = augment(rng, images, self.share, self.batch_size, self.crop_padding, self.flip)
      out[group] = dict(
          index=index[self.share], valid=valid[self.share], labels=labels, images=images
      )
    return out


class HostSource:
  """Reads, decodes and augments each step's share of the batch on the host, ahead of time.

  Args:
    records: random access to the split (``skd_jax.data.open_records``): ``len``,
      ``read(index) -> (images, labels)``, ``labels``, ``num_classes``, ``image_shape``.
    mesh: the ``data`` mesh.
    seed, batch_size, groups, crop_padding, flip: as ``skd_jax.data.sources.OnDeviceSource``.
    augment: ``'cifar'`` (``crop_padding`` and ``flip``) or ``'imagenet'`` (random-resized crops
      to ``image_size`` pixels and ``flip``; images of any size).
    image_size: the side of ``'imagenet'`` crops.
    workers: host worker processes (0: threads of this process).
    prefetch: steps read ahead.
    timeout_seconds: how long a worker may deliver no batch before :meth:`step_args` raises
      :class:`~skd_jax.errors.InputError` (ten times that for a worker's first batch).
  """

  def __init__(
      self,
      records,
      mesh,
      *,
      seed: int,
      batch_size: int,
      groups=(),
      crop_padding: int = 0,
      flip: bool = False,
      augment: str = 'cifar',
      image_size: int = 224,
      workers: int = 0,
      prefetch: int = 2,
      timeout_seconds: float = 300,
  ):
    unknown = set(groups) - set(sources.GROUPS)
    if unknown:
      raise ValueError(f'groups: unknown {sorted(unknown)}; expected some of {sources.GROUPS}')
    self.groups = ('main',) + tuple(g for g in sources.GROUPS[1:] if g in groups)
    self.reader = StepReader(
        records,
        seed=seed,
        batch_size=batch_size,
        groups=self.groups,
        crop_padding=crop_padding,
        flip=flip,
        augment=augment,
        image_size=image_size,
        share=_share(batch_size),
    )
    self.batch_size, self.steps_per_epoch = batch_size, self.reader.steps_per_epoch
    self._workers, self._prefetch = workers, prefetch
    self._timeout = timeout_seconds
    self._sharding = mesh_lib.sharded(mesh)
    self._iterator, self._first, self._next, self._in_flight = None, None, None, False
    self.wait_seconds = 0.0  # time step_args spent waiting for the pipeline

  @property
  def labels(self) -> np.ndarray:
    return self.reader.records.labels

  def _start(self, step: int):
    self.close()
    # Endless, closed by the trainer: at the end of a finite range grain's workers raise
    # StopIteration, whose traceback holds their last shared-memory arrays in a reference cycle,
    # alive past a normal exit (segments the resource tracker then reports as leaked).
    dataset = grain.MapDataset.range(step, sys.maxsize).map(self.reader)
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=max(1, self._prefetch), prefetch_buffer_size=self._prefetch)
    )
    if self._workers:
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here)
        flags.FLAGS.mark_as_parsed()
      iterable = iterable.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._workers),
          worker_init_fn=functools.partial(_worker_init, os.getpid()),
      )
    self._iterator, self._first, self._next = iter(iterable), step, step
    self._requests, self._results = queue.Queue(), queue.Queue()
    self._fetcher = threading.Thread(
        target=_fetch,
        args=(self._iterator, self._requests, self._results),
        daemon=True,
        name='skd_jax-input',
    )
    self._fetcher.start()

  def close(self):
    """Stops the pipeline and its workers (a later ``step_args`` starts it again).

    After a wait that was cut short (a signal, a timeout) a worker may be stopped or hung: the
    workers are continued (SIGCONT), asked to stop, and killed if they have not within a second.
    Shared memory that no batch of this process still uses is freed: what a killed worker held,
    and what grain failed to free.
    """
    if self._iterator is None:
      return
    self._requests.put(False)  # ends the fetching thread once it is idle
    killer, workers = None, []
    if self._in_flight:
      workers = list(_workers().values())
      for worker in workers:
        try:
          os.kill(worker.pid, signal.SIGCONT)
        except ProcessLookupError:
          pass
      killer = threading.Timer(_CLOSE_GRACE_SECONDS, lambda: [w.kill() for w in workers])
      killer.start()
    self._iterator.close()
    if killer:
      killer.cancel()
    for worker in workers:  # grain may have only signalled it: gone before its orphans are sought
      worker.join(_CLOSE_GRACE_SECONDS)
    # A batch that arrived for the abandoned wait holds shared memory until dropped.
    self._fetcher.join(_CLOSE_GRACE_SECONDS)
    while not self._results.empty():
      self._results.get()
    if self._workers:
      # Batches a failure left in reference cycles (an error's traceback holds grain's frames)
      # would keep their segments until the interpreter exits, past the resource tracker's count.
      gc.collect()
      _finish_frees()
      _unlink_orphans()
    self._iterator, self._in_flight = None, False

  def _worker(self, step: int) -> str:
    """Names the worker that reads ``step``, e.g. ``'input worker 1 of 2 (pid 4242)'``."""
    if not self._workers:
      return 'the input pipeline (threads of the trainer)'
    index = (step - self._first) % self._workers  # grain gives worker i every i-th step
    process = _workers().get(index)
    return f'input worker {index} of {self._workers}' + (f' (pid {process.pid})' if process else '')

  def _failure(self, step: int, error: Exception) -> Exception:
    """The error to raise for ``error``, which came instead of step ``step``'s batch: a worker's
    death in one line naming it; an error of the reader itself as it is."""
    died = re.search(r'terminated unexpectedly with exit code (-?\d+)', str(error))
    if not died or isinstance(error, (ConfigError, InputError)):
      return error
    code = int(died.group(1))
    cause = f'killed by {signal.Signals(-code).name}' if code < 0 else f'exit status {code}'
    return InputError(f'{self._worker(step)} died ({cause}) before delivering step {step}')

  def _wait(self, step: int) -> dict:
    """The pipeline's next batch (step ``step``), waited for in slices of ``_POLL_SECONDS``.

    Raises:
      Interrupted: a signal arrived (single process); a later call waits on.
      InputError: the worker of ``step`` delivered nothing within the timeout, or died.
    """
    started = time.perf_counter()
    limit = self._timeout
    if step - self._first < max(self._workers, 1):  # the worker's first batch: its start-up
      limit *= _START_FACTOR
    if not self._in_flight:
      self._requests.put(True)
      self._in_flight = True
    try:
      while True:
        try:
          local, error = self._results.get(timeout=_POLL_SECONDS)
          break
        except queue.Empty:
          if _signalled():
            raise Interrupted(step) from None
          if time.perf_counter() - started > limit:
            raise InputError(
                f'{self._worker(step)} delivered nothing for {limit:g} s (data.timeout_seconds='
                f'{self._timeout:g}) while training waited for step {step}'
            ) from None
    finally:
      self.wait_seconds += time.perf_counter() - started
    self._in_flight = False
    if error is not None:
      raise self._failure(step, error)
    return local

  def step_args(self, step: int) -> tuple[sources.Batch]:
    """Step ``step``'s global batch on the devices (the pipeline restarts for an unexpected step).

    Raises:
      Interrupted: a signal arrived while waiting (single process).
      InputError: a worker died or delivered nothing for ``timeout_seconds``.
    """
    if self._iterator is None or step != self._next:
      self._start(step)
    local = self._wait(step)
    if local.pop('step') != step:
      raise RuntimeError(f'input pipeline: expected step {step}')
    if self._workers:
      # The workers' arrays come in shared memory; JAX on a CPU would keep using that memory
      # instead of copying, and a batch still referenced at exit would leak its segments.
      local = jax.tree.map(np.array, local)
    self._next = step + 1
    put = lambda x: jax.make_array_from_process_local_data(
        self._sharding, x, (self.batch_size, *x.shape[1:])
    )
    return ({g: sources.Examples(**{k: put(v) for k, v in a.items()}) for g, a in local.items()},)

  def example_args(self) -> tuple[sources.Batch]:
    """The shapes, shardings and dtypes of :meth:`step_args`' result, for compiling ahead of time.

    Reads step 0 in this process: the workers start with the first step trained, once.
    """
    local = self.reader(0)
    del local['step']
    spec = lambda x: jax.ShapeDtypeStruct(
        (self.batch_size, *x.shape[1:]), x.dtype, sharding=self._sharding
    )
    return ({g: sources.Examples(**{k: spec(v) for k, v in a.items()}) for g, a in local.items()},)

  def batch(self, step, batch: sources.Batch) -> sources.Batch:
    """The batch ``step_args`` brought (traceable)."""
    del step
    return batch


class EvalBatchReader:
  """What a host worker runs for evaluation: batch number -> this process's share, as numpy."""

  def __init__(self, records, *, batch_size: int, transform, share: slice):
    self.records, self.batch_size, self.transform, self.share = (
        records,
        batch_size,
        transform,
        share,
    )

  def __call__(self, batch: int) -> dict:
    n = len(self.records)
    position = batch * self.batch_size + np.arange(self.batch_size)[self.share]
    index = np.minimum(position, n - 1)
    images, labels = self.records.read(index)
    return dict(index=index, valid=position < n, labels=labels, images=self.transform(images))


class HostEvalSet:
  """The test split streamed from the host in fixed-size batches, each process its share.

  ``batches()`` yields, in order, the arguments of ``skd_jax.evaluation.eval_batch`` for every
  batch: one global :class:`~skd_jax.data.sources.Examples` sharded along ``data``. Reading runs
  ``prefetch`` batches ahead in threads.
  """

  def __init__(self, records, mesh, *, batch_size: int, transform, prefetch: int = 2):
    self.num_examples = len(records)
    self.num_batches = samplers.steps_per_epoch(self.num_examples, batch_size)
    self.batch_size, self._prefetch = batch_size, prefetch
    self._reader = EvalBatchReader(
        records, batch_size=batch_size, transform=transform, share=_share(batch_size)
    )
    self._sharding = mesh_lib.sharded(mesh)

  def _put(self, local: dict) -> tuple[sources.Examples]:
    put = lambda x: jax.make_array_from_process_local_data(
        self._sharding, x, (self.batch_size, *x.shape[1:])
    )
    return (sources.Examples(**{k: put(v) for k, v in local.items()}),)

  def example_args(self) -> tuple[sources.Examples]:
    """The arguments' shapes, shardings and dtypes, for compiling ahead of time."""
    local = self._reader(0)
    spec = lambda x: jax.ShapeDtypeStruct(
        (self.batch_size, *x.shape[1:]), x.dtype, sharding=self._sharding
    )
    return (sources.Examples(**{k: spec(v) for k, v in local.items()}),)

  def batches(self):
    dataset = grain.MapDataset.range(self.num_batches).map(self._reader)
    options = grain.ReadOptions(
        num_threads=max(1, self._prefetch), prefetch_buffer_size=self._prefetch
    )
    for local in dataset.to_iter_dataset(options):
      yield self._put(local)
