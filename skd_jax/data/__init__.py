"""Whole-split image-classification data held in host memory as numpy.

`load_split` reads an entire (small) split into a `Dataset`; the trainer puts
it on the accelerator as uint8. Every example's stable integer index in its
split is its row in `Dataset.images` and `Dataset.labels`: index i is row i,
the same on every run and in every process, so per-example state (for example
past predictions kept by self-distillation losses) can be keyed by it.

A run opens its data with `open(config.data, mesh, eval_batch_size)`
(`skd_jax.data.splits.Splits`: the training set, its batch source, the test set,
the input shape and normalisation), for either pipeline.

Importing this package is cheap: TFDS is only imported by `load_split` when a
'tfds' source is requested, JAX only by `open`.

Data from outside skd_jax is named by import path, `config.data.module =
'mylab.data'` (`skd_jax.plugins`): the module's `make(data_config, split)`
returns the whole split as a `Dataset` (device pipeline only; `data.source`
and `data.name` are then labels).
"""

import hashlib
from typing import Any, NamedTuple

import numpy as np

from skd_jax.data.idx import FASHION_MNIST_DIR
from skd_jax.data.idx import FASHION_MNIST_NUM_CLASSES
from skd_jax.data.idx import FashionMnistRecords
from skd_jax.data.idx import load_fashion_mnist
from skd_jax.data.idx import read_idx
from skd_jax import plugins
from skd_jax.errors import ConfigError

__all__ = [
    'Dataset',
    'FASHION_MNIST_DIR',
    'identity',
    'load_fashion_mnist',
    'load_split',
    'open',
    'open_records',
    'read_idx',
]


class Dataset(NamedTuple):
  """One whole split; row i of both arrays is the example with index i.

  Attributes:
    images: uint8 [N, H, W, C] (C == 1 for grayscale).
    labels: int32 [N], in [0, num_classes).
    num_classes: number of classes.
    selection: the subset and label noise applied (``skd_jax.data.selection``), or None.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  selection: Any = None


def _source(data_config) -> tuple[str, str]:
  source, name = data_config.get('source'), data_config.get('name')
  if source == 'idx' and name != 'fashion_mnist':
    raise ConfigError(
        f"data.name: source 'idx' only supports 'fashion_mnist', got"
        f" {name!r}; use data.source='tfds' for other datasets"
    )
  if source == 'tfds' and (not name or not isinstance(name, str)):
    raise ConfigError(f'data.name: expected a TFDS dataset name such as cifar10, got {name!r}')
  if source not in ('idx', 'tfds'):
    raise ConfigError(f"data.source: expected 'idx' or 'tfds', got {source!r}")
  return source, name


def open(data_config, mesh, eval_batch_size: int):  # pylint: disable=redefined-builtin
  """A run's training and test sets (``skd_jax.data.splits.Splits``) as ``data_config`` says.

  Raises:
    ConfigError: an invalid config or missing/corrupt data.
  """
  from skd_jax.data import splits  # pylint: disable=g-import-not-at-top

  return splits.Splits(data_config, mesh, eval_batch_size)


def open_records(data_config, split: str):
  """Random access to a split without loading it: ``len``, ``read(index)``, ``labels``,
  ``num_classes`` and ``image_shape`` (``idx.FashionMnistRecords``, ``tfds_source.TfdsRecords``).

  Raises:
    ConfigError: an invalid config or missing data.
  """
  source, name = _source(data_config)
  if source == 'idx':
    return FashionMnistRecords(data_config.get('dir') or FASHION_MNIST_DIR, split)
  from skd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  return tfds_source.TfdsRecords(
      name,
      split,
      data_dir=data_config.get('dir') or None,
      download=bool(data_config.get('download', False)),
      variable_size=data_config.get('augment') == 'imagenet',
  )


def load_split(data_config, split: str) -> Dataset:
  """Loads a whole split as described by the `data` config section.

  Args:
    data_config: ConfigDict with fields `source` ('idx' or 'tfds'), `name`
      (must be 'fashion_mnist' for 'idx'; a TFDS name for 'tfds'), `dir` (the
      idx folder, default `FASHION_MNIST_DIR`; or the TFDS data_dir, empty for
      TFDS's default) and `download` (tfds only: download and prepare a
      missing dataset).
    split: 'train' or 'test' for 'idx'; any TFDS split expression such as
      'train[:90%]' for 'tfds'.

  Returns:
    The split, with example index i at row i.

  Raises:
    ConfigError: an invalid config or missing/corrupt data; a plug-in
      (`data.module`) that does not import, has no `make`, or returns no valid
      `Dataset`.
  """
  if data_config.get('module'):
    return _from_plugin(data_config, split)
  source, name = _source(data_config)
  if source == 'idx':
    images, labels = load_fashion_mnist(data_config.get('dir') or FASHION_MNIST_DIR, split)
    return Dataset(images, labels, FASHION_MNIST_NUM_CLASSES)
  # Imported here so that `import skd_jax.data` never pulls in TFDS.
  from skd_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

  images, labels, num_classes = tfds_source.load_tfds(
      name,
      split,
      data_dir=data_config.get('dir') or None,
      download=bool(data_config.get('download', False)),
  )
  return Dataset(images, labels, num_classes)


def _from_plugin(data_config, split: str) -> Dataset:
  """The split that `data.module`'s `make(data_config, split)` returns, checked."""
  make = plugins.load(data_config.module, 'data.module')
  plugins.check_call(make, 'data.module', data_config, split)
  found = make(data_config, split)

  def fail(expected):
    raise ConfigError(f'data.module: make(data, {split!r}) returned {expected}')

  if not isinstance(found, Dataset):
    fail(f'{type(found).__name__}; expected a skd_jax.data.Dataset')
  images, labels, num_classes = found.images, found.labels, found.num_classes
  if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4):
    fail(
        f'images {getattr(images, "dtype", "?")}{list(np.shape(images))}; expected uint8 [N, H, W, C]'
    )
  if not isinstance(num_classes, int) or num_classes < 1:
    fail(f'num_classes {num_classes!r}; expected a positive integer')
  labels = np.asarray(labels)
  if not (
      np.issubdtype(labels.dtype, np.integer)
      and labels.shape == images.shape[:1]
      and ((labels >= 0) & (labels < num_classes)).all()
  ):
    fail(f'labels {labels.dtype}{list(labels.shape)}; expected [N] integers in [0, {num_classes})')
  return Dataset(images, labels.astype(np.int32), num_classes)


def identity(data_config, labels: np.ndarray, selection=None) -> dict[str, Any]:
  """What identifies a training set, at no cost even for ImageNet: its source, name and split,
  its number of examples and the SHA-256 of its labels in index order (int32, little-endian).

  ``labels`` are the labels trained on. With a subset or label noise (``selection``, a
  ``skd_jax.data.selection.Selection``) they are the chosen examples' noisy labels, and the
  identity adds what was chosen (``Selection.identity``: ``subset``, ``label_noise``).

  Where the files lie (``data.dir``) is no part of it, and images are not read: a set whose
  images changed under the same labels has the same identity.
  """
  return {
      'source': data_config.source,
      'name': data_config.name,
      'split': data_config.train_split,
      'examples': len(labels),
      'labels_sha256': hashlib.sha256(np.asarray(labels, '<i4').tobytes()).hexdigest(),
      **({'module': data_config.module} if data_config.get('module') else {}),
      **(selection.identity() if selection is not None else {}),
  }
