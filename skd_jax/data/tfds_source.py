"""Whole-split image-classification loading through TFDS random access.

This is the only module of skd_jax that imports `tensorflow_datasets`; it reads
prepared array_record files through `tfds.data_source`, so TensorFlow is not
needed at training time. Examples must have the standard TFDS
image-classification keys: 'image' (a fixed-shape uint8 `tfds.features.Image`)
and 'label' (a `tfds.features.ClassLabel`).
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from skd_jax.errors import ConfigError

# Examples fetched per random-access batch read.
_CHUNK = 1024

# Longest error reason quoted from TFDS inside our one-line messages.
_MAX_REASON = 160


def _short_reason(e: BaseException) -> str:
  """Returns `e` as one short line: its type and the first line of its text."""
  lines = str(e).strip().splitlines()
  first = lines[0].strip().rstrip(':') if lines else ''
  reason = f'{type(e).__name__}: {first}' if first else type(e).__name__
  if len(reason) > _MAX_REASON:
    reason = reason[: _MAX_REASON - 3] + '...'
  return reason


def _open(name: str, split: str, data_dir: str | None, download: bool):
  """Returns the TFDS random-access data source, or raises ConfigError."""
  try:
    return tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        # Random access only works on array_record (or parquet) files, while
        # TFDS prepares TFRecord by default whenever data_dir is given.
        download_and_prepare_kwargs=({'file_format': 'array_record'} if download else None),
    )
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(
        f'data.name: unknown TFDS dataset {name!r}; expected a registered'
        ' image-classification dataset such as cifar10, cifar100,'
        ' fashion_mnist, svhn_cropped'
    ) from None
  except Exception as e:  # pylint: disable=broad-exception-caught
    # TFDS reports a missing or TFRecord-only dataset, and a failed download
    # or preparation, through many unrelated exception types (ValueError,
    # NotImplementedError, ModuleNotFoundError, network errors, ...); the user
    # needs the same advice for all of them. A bad split is the exception.
    # The cause stays chained for debugging; the message is what users see.
    reason = _short_reason(e)
    if isinstance(e, ValueError) and 'Unknown split' in str(e):
      raise ConfigError(
          f'data.name: TFDS dataset {name!r} has no split {split!r} ({reason});'
          " expected one of its splits, optionally sliced as in 'train[:90%]'"
      ) from e
    where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
    build = (
        f'on a machine with internet run `pip install tensorflow && tfds build'
        f' {name} --file_format=array_record --data_dir=DIR` and point'
        ' --config.data.dir at DIR'
    )
    if download:
      raise ConfigError(
          f'data.name: TFDS dataset {name!r} (split {split!r}) is not prepared'
          f' in array_record format in {where} and could not be downloaded'
          f' ({reason}); {build}'
      ) from e
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} (split {split!r}) is not prepared'
        f' in array_record format in {where} ({reason}); {build}, or set'
        ' --config.data.download=True'
    ) from e


def _check_features(name: str, features) -> tuple[tuple[int, ...], int]:
  """Returns (image shape, num_classes), or raises ConfigError."""
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
  if len(shape) != 3 or any(d is None for d in shape):
    raise ConfigError(
        f'data.name: TFDS dataset {name!r} has images of variable shape'
        f' {shape}; expected a dataset with fixed-size HxWxC images'
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
