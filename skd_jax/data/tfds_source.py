"""Whole-split image-classification loading through TFDS random access.

This is the only module of skd_jax that imports `tensorflow_datasets`; it reads
prepared array_record files through `tfds.data_source`, so TensorFlow is not
needed at training time. Examples must have the standard TFDS
image-classification keys: 'image' (a fixed-shape uint8 `tfds.features.Image`,
or of any height and width for `TfdsRecords(variable_size=True)`) and 'label'
(a `tfds.features.ClassLabel`). TFDS decodes the images (JPEG or PNG) with
OpenCV when it is installed, else with PIL.
"""

import contextlib
import copy
import io
import os
import shutil
import socket
import urllib.parse

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from skd_jax.data import resized_crops
from skd_jax.errors import ConfigError, first_line

# Examples fetched per random-access batch read.
_CHUNK = 1024

# Longest error reason quoted from TFDS inside our one-line messages.
_MAX_REASON = 160

# How long a download host may take to accept a connection before it counts as unreachable.
_PROBE_SECONDS = 5


def _short_reason(e: BaseException) -> str:
  """Returns `e` as one short line: its type and the first line of its text."""
  first = first_line(e).rstrip(':')
  reason = f'{type(e).__name__}: {first}' if first else type(e).__name__
  if len(reason) > _MAX_REASON:
    reason = reason[: _MAX_REASON - 3] + '...'
  return reason


def _fix(name: str) -> str:
  return (
      f'on a machine with internet run `pip install tensorflow && tfds build {name}'
      ' --file_format=array_record --data_dir=DIR` and point --config.data.dir at DIR'
  )


@contextlib.contextmanager
def _quiet():
  """Keeps TFDS's log lines, prints and progress bars out of the user's terminal."""
  level = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    absl_logging.set_verbosity(level)


def _unreachable(hosts: list[str]) -> str | None:
  """Why the first unreachable host cannot be reached, or None when all answer (HTTPS port)."""
  for host in hosts:
    try:
      socket.create_connection((host, 443), timeout=_PROBE_SECONDS).close()
    except OSError as e:
      return f'cannot reach {host}: {e.strerror or type(e).__name__}'
  return None


def _download_hosts(name: str, data_dir: str | None) -> list[str]:
  """The hosts a dataset's registered download URLs point to (none when TFDS lists none)."""
  urls = tfds.builder(name, data_dir=data_dir).url_infos or {}
  return sorted({urllib.parse.urlparse(url).hostname for url in urls})


def _paths(root: str) -> set[str]:
  return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


def _prepare(name: str, split: str, data_dir: str | None):
  """Downloads and prepares the dataset; on failure removes everything the attempt created."""
  root = os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets')
  why = _unreachable(_download_hosts(name, data_dir))
  if why:  # fail at once: TFDS itself retries for minutes and leaves incomplete folders
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} is not prepared in {root} and cannot be downloaded'
        f' ({why}); {_fix(name)}'
    )
  existed = os.path.isdir(root)
  before = _paths(root)
  try:
    with _quiet():
      return tfds.data_source(
          name,
          split=split,
          data_dir=data_dir,
          download=True,
          # Random access only works on array_record (or parquet) files, while TFDS prepares
          # TFRecord by default whenever data_dir is given.
          download_and_prepare_kwargs={'file_format': 'array_record'},
      )
  except Exception as e:  # pylint: disable=broad-exception-caught
    created = _paths(root) - before
    for path in sorted(created, key=len):  # the top-most new paths first
      if any(path.startswith(p + os.sep) for p in created if p != path):
        continue
      shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    if not existed:
      shutil.rmtree(root, ignore_errors=True)
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} could not be downloaded and prepared in {root}'
        f' ({_short_reason(e)}); {_fix(name)}'
    ) from e


def _open(name: str, split: str, data_dir: str | None, download: bool):
  """Returns the TFDS random-access data source, or raises ConfigError."""
  try:
    with _quiet():
      return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(
        f'data.name: unknown TFDS dataset {name!r}; expected a registered'
        ' image-classification dataset such as cifar10, cifar100,'
        ' fashion_mnist, svhn_cropped'
    ) from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    # TFDS reports a missing or TFRecord-only dataset through many unrelated exception types
    # (ValueError, AssertionError, FileNotFoundError, ...); the user needs the same advice for
    # all of them. A bad split is the exception. The cause stays chained for debugging.
    reason = _short_reason(e)
    if isinstance(e, ValueError) and 'Unknown split' in str(e):
      raise ConfigError(
          f'data.name: TFDS dataset {name!r} has no split {split!r} ({reason});'
          " expected one of its splits, optionally sliced as in 'train[:90%]'"
      ) from e
    if download:
      return _prepare(name, split, data_dir)
    where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} (split {split!r}) is not prepared'
        f' in array_record format in {where} ({reason}); {_fix(name)}, or set'
        ' --config.data.download=True'
    ) from e


def _check_features(name: str, features, variable_size=False) -> tuple[tuple[int, ...], int]:
  """Returns (image shape, num_classes), or raises ConfigError; with `variable_size`, the
  height and width may be None."""
  image = features['image'] if 'image' in features else None
  label = features['label'] if 'label' in features else None
  if not isinstance(image, tfds.features.Image):
    raise ConfigError(
        f"data.name: TFDS dataset {name!r} has no 'image' Image feature;"
        " expected an image-classification dataset with 'image' and 'label'"
    )
  if not isinstance(label, tfds.features.ClassLabel):
    raise ConfigError(
        f"data.name: TFDS dataset {name!r} has no 'label' ClassLabel feature;"
        " expected an image-classification dataset with 'image' and 'label'"
    )
  shape = tuple(image.shape)
  fixed = shape[-1:] if variable_size else shape
  if len(shape) != 3 or any(d is None for d in fixed):
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} has images of variable shape'
        f' {shape}; expected a dataset with fixed-size HxWxC images, or'
        " data.augment='imagenet' with data.pipeline='host'"
    )
  if np.dtype(image.np_dtype) != np.uint8:
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} has {np.dtype(image.np_dtype)}'
        ' images; expected uint8 images'
    )
  return shape, int(label.num_classes)


def _examples(ds):
  """Yields the examples of `ds` in index order."""
  n = len(ds)
  # Batch reads are much faster on real array_record files, but
  # `tfds.testing.mock_data` breaks `__getitems__` (TypeError), so fall back to
  # one read per example when the first batch read fails that way.
  try:
    first = ds.__getitems__(list(range(min(_CHUNK, n))))
  except (TypeError, AttributeError):
    for i in range(n):
      yield ds[i]
    return
  yield from first
  start = len(first)
  while start < n:
    indices = list(range(start, min(start + _CHUNK, n)))
    yield from ds.__getitems__(indices)
    start += len(indices)


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = False,
) -> tuple[np.ndarray, np.ndarray, int]:
  """Loads a whole TFDS image-classification split into host memory.

  Examples are returned in the order of the prepared array_record files, so
  row i is the example at random-access index i of the (possibly sliced) split:
  its stable index, identical across runs and processes for the same prepared
  data.

  Args:
    name: registered TFDS name, optionally with config and version
      ('cifar10', 'cifar100:3.0.2').
    split: split expression passed through to TFDS, e.g. 'train',
      'train[:90%]' or 'test'.
    data_dir: folder with prepared datasets; None means TFDS's default
      ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    download: download and prepare the dataset (as array_record) when it is
      not prepared yet; needs internet and, for most datasets, TensorFlow.

  Returns:
    images: uint8 [N, H, W, C]; grayscale datasets keep C == 1.
    labels: int32 [N], in [0, num_classes).
    num_classes: the number of classes of the 'label' ClassLabel.

  Raises:
    ConfigError: unknown dataset or split, dataset not prepared and not
      downloadable, or not an image-classification dataset with fixed-size
      uint8 'image' and ClassLabel 'label'.
  """
  ds = _open(name, split, data_dir, download)
  shape, num_classes = _check_features(name, ds.dataset_info.features)
  n = len(ds)
  if n == 0:
    raise ConfigError(
        f'data.name: split {split!r} of TFDS dataset {name!r} is empty;'
        ' expected a split with at least one example'
    )
  images = np.empty((n,) + shape, dtype=np.uint8)
  labels = np.empty((n,), dtype=np.int32)
  count = 0
  for i, example in enumerate(_examples(ds)):
    count += 1
    image = np.asarray(example['image'])
    if image.shape != shape:
      raise ConfigError(
          f'data.name: example {i} of TFDS dataset {name!r} split {split!r}'
          f' has image shape {image.shape}; expected {shape} as declared'
      )
    images[i] = image
    labels[i] = example['label']
  if count != n:
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} split {split!r} yielded {count} of'
        f' its {n} examples; expected all of them, prepare the dataset again'
    )
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} split {split!r} has labels outside'
        f' [0, {num_classes})'
    )
  return images, labels, num_classes


def _stored_image(value, channels: int):
  """An image feature read with ``SkipDecoding``: its file, ``Encoded``; a uint8 array as it is
  (``tfds.testing.mock_data`` hands images over decoded whatever the decoders say)."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    return value
  return resized_crops.Encoded(bytes(value), channels)


class TfdsRecords:
  """Random access to a prepared TFDS split (ArrayRecord) for the host-streaming source.

  Reading an example reads and decodes that record only. ``labels`` (every label, for the
  partner sampler) reads the whole split once, on first use, in batches and without decoding
  images. With ``variable_size``, images may have any height and width: ``image_shape`` is
  ``(None, None, C)`` and ``read`` returns a list of the files still encoded
  (``skd_jax.data.resized_crops.Encoded``), which the ImageNet crops decode only as far as they
  need.
  """

  def __init__(
      self,
      name: str,
      split: str,
      *,
      data_dir: str | None,
      download: bool,
      variable_size: bool = False,
  ):
    self._source = _open(name, split, data_dir, download)
    features = self._source.dataset_info.features
    self.image_shape, self.num_classes = _check_features(name, features, variable_size)
    if not len(self._source):
      raise ConfigError(f'data.name: split {split!r} of TFDS dataset {name!r} is empty')
    self._labels = None
    self._encoded = self._skip_decoding() if variable_size else None

  def _skip_decoding(self):
    """A copy of the source that shares its open files but leaves every Image feature as the
    stored bytes (``SkipDecoding`` works without TensorFlow)."""
    features = self._source.dataset_info.features
    encoded = copy.copy(self._source)
    encoded.decoders = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
    }
    return encoded

  def __len__(self) -> int:
    return len(self._source)

  @property
  def labels(self) -> np.ndarray:
    """int32 labels of the whole split in index order, read once without decoding any image."""
    if self._labels is None:
      # Decoding ImageNet's 1.28M training JPEGs here would take over an hour before training
      # starts.
      labels_only = self._skip_decoding()
      self._labels = np.array([e['label'] for e in _examples(labels_only)], np.int32)
    return self._labels

  def read(self, index: np.ndarray) -> tuple[np.ndarray | list[np.ndarray], np.ndarray]:
    """uint8 images ``[n, H, W, C]`` (a list of ``Encoded`` files when sizes vary; of arrays
    under ``tfds.testing.mock_data``) and int32
    labels ``[n]`` of the examples ``index``."""
    if self._encoded is not None:
      examples = [self._encoded[int(i)] for i in index]
      channels = self.image_shape[-1]
      images = [_stored_image(e['image'], channels) for e in examples]
    else:
      examples = [self._source[int(i)] for i in index]
      images = np.stack([np.asarray(e['image'], np.uint8) for e in examples])
    return images, np.array([e['label'] for e in examples], np.int32)
