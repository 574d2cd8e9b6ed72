r"""Images/s of the ImageNet host input path: decoding a whole JPEG, or only what its crop needs.

Three paths, timed in interleaved rounds in one process (ratios are meaningful on a busy machine):

* ``before``: the records decode every JPEG whole, as ``TfdsRecords`` did through TFDS (PIL, to
  numpy), and the crops resample the numpy image (``resized_crops`` on arrays);
* ``pillow``: the records hand over the encoded files (``resized_crops.Encoded``) and the crops
  decode each one only as far as its box needs with Pillow (DCT-domain downscale by
  ``Image.draft``, one PIL ``resize`` of the box): ``resized_crops.codec()`` ``'pillow'``, what
  ``SKD_JAX_JPEG=pillow`` or a missing ``jpeg`` extra gives (the README's earlier "after");
* ``simplejpeg``: the same files and boxes through the ``jpeg`` extra: libjpeg-turbo
  (``simplejpeg``) decodes, downscaled in the DCT domain likewise, and ``fast_image_resize``
  (``cykooz-resizer``, SIMD) resamples the box with PIL's bilinear filter (left out, with a note,
  when the extra is not installed).

For each image size, each path is timed on

* ``train``: ``StepReader``, a batch's reading, decoding, random-resized crops, flips and stacking;
* ``eval``: ``EvalBatchReader`` with the evaluation transform (shorter side to ``--eval_resize``,
  centre crop);

in this process's main thread (one core), and, with ``--workers``, ``train`` of the first size
through ``HostSource`` with that many ``data.workers`` processes (images/s of them together; each
block starts the workers afresh, so no idle worker refills its buffer while another job is timed,
and is timed after the batches its workers buffered during the start-up).

Per path the table shows images/s of wall-clock time and, for the main-thread cases, the thread's
CPU milliseconds per image (``time.thread_time``) and the images/s per core they make: on a
shared, loaded machine the wall-clock rate is the share of a core the thread got, the CPU time
what an image costs a core. Ratios are the median over the rounds of each round's ratio of
adjacent blocks, of wall-clock time and of CPU time.

The JPEGs are synthesised: per channel a random field with a 1/f amplitude spectrum (the
spectrum of natural images), channels correlated, plus a smooth colour gradient and pixel noise,
saved at quality 90 with 4:2:0 chroma subsampling (as most ImageNet files are). A libjpeg decode
costs about what its entropy-coded data costs (decoding at 1/8 scale, which leaves out almost all
IDCT and colour work, still costs about 3/4 of a whole decode), so what makes the timing
representative is the compressed size per pixel: these files take about 0.55-0.65 bytes per pixel
(printed), ImageNet's training JPEGs about 0.59 (110 KB for a typical 500 x 375 image).

  python benchmarks/input_throughput.py
  python benchmarks/input_throughput.py --sizes=500x375,1024x768 --rounds=7 --workers=2
"""

import io
import os
import statistics
import time
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import numpy as np
from PIL import Image

from skd_jax.data import resized_crops
from skd_jax.data import streaming

FLAGS = flags.FLAGS
PATHS = ('before', 'pillow', 'simplejpeg')


def synthetic_jpeg(rng: np.random.Generator, height: int, width: int) -> bytes:
  """A natural-looking RGB JPEG (quality 90, 4:2:0): a 1/f^1.1 random field, a gradient, noise."""
  fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
  frequency = np.hypot(fx, fy)
  frequency[0, 0] = 1.0
  fields = []
  for _ in range(3):
    spectrum = rng.normal(size=frequency.shape) + 1j * rng.normal(size=frequency.shape)
    spectrum /= frequency**1.1
    spectrum[0, 0] = 0.0
    fields.append(np.fft.irfft2(spectrum, (height, width)))
  mixing = np.array([[1.0, 0.8, 0.6], [0.0, 0.6, 0.3], [0.0, 0.0, 0.5]])  # correlated channels
  x = np.stack(fields, -1) @ mixing
  x = (x - x.mean()) / x.std() * 45.0 + 128.0
  y, z = np.mgrid[0:height, 0:width] / max(height, width) - 0.5
  x += 40.0 * np.stack([y, z, (y + z) / 2], -1) + rng.normal(0.0, 4.0, x.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(
      out, 'JPEG', quality=90, subsampling='4:2:0'
  )
  return out.getvalue()


class Records:
  """Random access to JPEGs as ``TfdsRecords(variable_size=True)``: ``read`` returns them
  ``Encoded`` (``decode=False``, the path after), or decoded whole as TFDS's PIL decoder does
  (``decode=True``, the path before). Picklable, for worker processes."""

  num_classes = 10
  image_shape = (None, None, 3)

  def __init__(self, files: list[bytes], decode: bool):
    self.files, self.decode = files, decode
    self.labels = np.arange(len(files), dtype=np.int32) % self.num_classes

  def __len__(self) -> int:
    return len(self.files)

  def read(self, index: np.ndarray):
    encoded = [resized_crops.Encoded(self.files[int(i)], 3) for i in index]
    if self.decode:
      return [_tfds_decode(e.data) for e in encoded], self.labels[index]
    return encoded, self.labels[index]


def _tfds_decode(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:  # TFDS's decode_example_np_with_pil
    return np.asarray(image, np.uint8)


def _step_reader(records, batch_size: int, image_size: int):
  return streaming.StepReader(
      records,
      seed=0,
      batch_size=batch_size,
      groups=('main',),
      crop_padding=0,
      flip=True,
      share=slice(0, batch_size),
      augment='imagenet',
      image_size=image_size,
  )


def _with_codec(path: str, job):
  """``job`` run with the records' crops decoded by ``path``'s codec (``SKD_JAX_JPEG``, read at
  every batch and inherited by worker processes started meanwhile)."""

  def block():
    before = os.environ.get(resized_crops.CODEC_ENV)
    os.environ[resized_crops.CODEC_ENV] = 'simplejpeg' if path == 'simplejpeg' else 'pillow'
    try:
      return job()
    finally:
      if before is None:
        del os.environ[resized_crops.CODEC_ENV]
      else:
        os.environ[resized_crops.CODEC_ENV] = before

  return block


def _blocks(function, steps: int):
  """A job timing ``steps`` calls ``function(0), function(1), ...`` (step numbers go on): its
  ``(wall-clock seconds, this thread's CPU seconds)``."""
  counter = [0]

  def block() -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.thread_time()
    for _ in range(steps):
      function(counter[0])
      counter[0] += 1
    return time.perf_counter() - start, time.thread_time() - cpu

  return block


def _source_blocks(records, batch_size, image_size, workers, steps, mesh):
  """A job timing ``steps`` batches of a fresh ``HostSource`` after those its workers made during
  their start-up: ``(wall-clock seconds, None)`` (the CPU time is the workers')."""

  def block() -> tuple[float, None]:
    source = streaming.HostSource(
        records,
        mesh,
        seed=0,
        batch_size=batch_size,
        flip=True,
        augment='imagenet',
        image_size=image_size,
        workers=workers,
        timeout_seconds=60,
    )
    # The first batches were made during the start-up: a worker buffers up to data.prefetch (2)
    # steps, and grain's queue one more, before the timed ones come at the rate they are made.
    untimed = 1 + 3 * workers
    try:
      for step in range(untimed):
        jax.block_until_ready(source.step_args(step))
      start = time.perf_counter()
      for step in range(untimed, untimed + steps):
        jax.block_until_ready(source.step_args(step))
      return time.perf_counter() - start, None
    finally:
      source.close()

  return block


def paths() -> tuple[str, ...]:
  """The paths this installation can time: ``simplejpeg`` only with the ``jpeg`` extra."""
  return PATHS if resized_crops.simplejpeg is not None else PATHS[:2]


def make_jobs(files_by_size, *, batch_size, steps, image_size, eval_resize, workers, mesh=None):
  """``{(case, size, path): job}``: a job returns ``(wall-clock, CPU or None)`` seconds of
  ``steps`` batches.

  Cases: ``'train'`` and ``'eval'`` in this thread, ``'train, N workers'`` through
  ``HostSource`` for the first size when ``workers`` (and a ``mesh``) are given.
  """
  transform = streaming.eval_transform('imagenet', image_size, eval_resize)
  jobs = {}
  for number, (size, files) in enumerate(files_by_size.items()):
    for path in paths():
      records = Records(files, decode=path == 'before')
      reader = _step_reader(records, batch_size, image_size)
      jobs['train', size, path] = _with_codec(path, _blocks(reader, steps))
      evaluate = streaming.EvalBatchReader(
          records, batch_size=batch_size, transform=transform, share=slice(0, batch_size)
      )
      jobs['eval', size, path] = _with_codec(
          path, _blocks(lambda b, e=evaluate, n=len(files): e(b % n), steps)
      )
      if workers and number == 0:
        jobs[f'train, {workers} workers', size, path] = _with_codec(
            path, _source_blocks(records, batch_size, image_size, workers, steps, mesh)
        )
  return jobs


def interleaved(jobs, rounds: int) -> dict:
  """``{name: [(wall, cpu) seconds in round 1, ...]}``: each round runs every job once, in turn."""
  for job in jobs.values():  # warm: caches, lazy imports
    job()
  times = {name: [] for name in jobs}
  for _ in range(rounds):
    for name, job in jobs.items():
      times[name].append(job())
  return times


class Row(NamedTuple):
  """One path of one case: medians over the rounds. ``cpu_ms`` and the CPU ratio are None where
  the work ran in worker processes."""

  case: str
  size: str
  path: str
  images_per_s: float  # wall-clock
  cpu_ms: float | None  # this thread's CPU milliseconds per image
  ratio: float  # wall-clock time of 'before' / this path's, per round
  cpu_ratio: float | None  # likewise of CPU time


def summary(times, images_per_block: int) -> list[Row]:
  """A :class:`Row` per ``(case, size, path)`` of ``times``: median images/s and CPU time per
  image over the rounds, and the median of the rounds' ratios to ``before`` (each from one round's
  blocks)."""
  rows = []
  cases = dict.fromkeys((case, size) for case, size, _ in times)  # in order, each once
  for (case, size), path in ((c, p) for c in cases for p in PATHS if (*c, p) in times):
    blocks, before = times[case, size, path], times[case, size, 'before']
    wall, cpu = ([t[k] for t in blocks] for k in (0, 1))
    measured = cpu[0] is not None
    rows.append(
        Row(
            case,
            size,
            path,
            images_per_block / statistics.median(wall),
            1e3 * statistics.median(cpu) / images_per_block if measured else None,
            statistics.median(b[0] / t[0] for b, t in zip(before, blocks)),
            statistics.median(b[1] / t[1] for b, t in zip(before, blocks)) if measured else None,
        )
    )
  return rows


def _define_flags():
  """The command line's flags: defined only when run, so that tests may import this module
  beside other benchmarks whose flags share names."""
  flags.DEFINE_list(
      'sizes', ['500x375', '375x500', '1024x768'], 'Image sizes WIDTHxHEIGHT, each timed apart.'
  )
  flags.DEFINE_integer('images', 16, 'Distinct JPEGs per size.')
  flags.DEFINE_integer('batch_size', 32, 'Images per batch.')
  flags.DEFINE_integer('steps', 4, 'Batches per timed block.')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; medians are shown.')
  flags.DEFINE_integer(
      'workers', 2, 'data.workers of the HostSource jobs, first size only (0: none).'
  )
  flags.DEFINE_integer('image_size', 224, 'Side of the crops.')
  flags.DEFINE_integer('eval_resize', 256, 'Shorter side before the eval crop.')


def main(argv):
  del argv
  rng = np.random.default_rng(0)
  files_by_size = {}
  for size in FLAGS.sizes:
    width, height = (int(n) for n in size.split('x'))
    files_by_size[size] = [synthetic_jpeg(rng, height, width) for _ in range(FLAGS.images)]
    per_pixel = np.mean([len(f) for f in files_by_size[size]]) / (width * height)
    print(f'{size}: {FLAGS.images} JPEGs, {per_pixel:.3f} bytes per pixel (ImageNet ~0.59)')
  mesh = None
  if FLAGS.workers:
    from skd_jax import train  # pylint: disable=g-import-not-at-top  # only for the mesh

    mesh = train.make_mesh(jax.devices()[:1])
  jobs = make_jobs(
      files_by_size,
      batch_size=FLAGS.batch_size,
      steps=FLAGS.steps,
      image_size=FLAGS.image_size,
      eval_resize=FLAGS.eval_resize,
      workers=FLAGS.workers,
      mesh=mesh,
  )
  if 'simplejpeg' not in paths():
    print("simplejpeg path left out: install the jpeg extra (pip install 'skd_jax[jpeg]')")
  times = interleaved(jobs, FLAGS.rounds)
  print(
      f'{FLAGS.rounds} rounds x {FLAGS.steps} batches of {FLAGS.batch_size}, crops of'
      f' {FLAGS.image_size} (eval: resize {FLAGS.eval_resize}); medians. img/s: wall-clock;'
      ' CPU ms: per image, of this thread; per core: 1000 / CPU ms; x before: ratio of times'
  )
  print(
      f'{"case":<18} {"size":>9} {"path":>10} {"img/s":>7} {"CPU ms":>7} {"per core":>8}'
      f' {"x before":>8} {"x before (CPU)":>14}'
  )
  for row in summary(times, FLAGS.steps * FLAGS.batch_size):
    cpu = f'{row.cpu_ms:7.2f} {1e3 / row.cpu_ms:8.0f}' if row.cpu_ms is not None else f'{"-":>16}'
    cpu_ratio = f'{row.cpu_ratio:14.2f}' if row.cpu_ratio is not None else f'{"-":>14}'
    print(
        f'{row.case:<18} {row.size:>9} {row.path:>10} {row.images_per_s:7.1f} {cpu}'
        f' {row.ratio:8.2f} {cpu_ratio}'
    )


if __name__ == '__main__':
  _define_flags()
  app.run(main)
