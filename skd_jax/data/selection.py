"""Which training examples a run trains on, and with which labels.

Two options of the ``data`` config section change the training set, never the test split:

* ``data.train_examples = N`` (0: the whole split) trains on a class-balanced subset: ``N / C``
  examples of each of the ``C`` classes, drawn by :func:`balanced_subset` from
  ``data.subset_seed``. ``N`` must be a multiple of ``C`` and every class must have ``N / C``
  examples in the split; otherwise the run is refused with one line naming the field. With one
  seed, a smaller subset is contained in a larger one.
* ``data.label_noise = r`` (in ``[0, 1)``) trains on labels with symmetric noise, drawn by
  :func:`symmetric_noise` from ``data.noise_seed``: exactly ``round(r * N)`` examples (halves
  rounded up) of the (sub)set have their label replaced by one of the ``C - 1`` *other* classes,
  uniformly. So ``r`` is the realised fraction of wrong labels. (Papers that draw the new label
  from all ``C`` classes, the old one included, reach a fraction of ``r (C - 1) / C``: their rate
  ``r'`` is ``r' (C - 1) / C`` here.) With one seed, a higher rate changes a superset of the
  labels a lower one changes, each to the same class.

Both draws use numpy generators of their own seeds, independent of the run's ``seed``, so one
training set can be trained on with several run seeds. The subset keeps the split's order: its
example ``i`` (the index per-example state is kept under, ``skd_jax.example_rows``) is the
``i``-th selected example in the split's index order, the same for both pipelines.
:func:`select_dataset` (on-device pipeline) and :func:`select_records` (host pipeline) apply the
options; :class:`Selection` records what they chose, for ``data.json`` and the log.
"""

import hashlib
from typing import Any, NamedTuple

import numpy as np

from skd_jax.errors import ConfigError

# Second words of the generators' seeds, so that subset_seed 0 and noise_seed 0 draw unrelated
# numbers (and none of the run's streams, which are seeded from 3 words).
_SUBSET, _NOISE = 1, 2


def sha256(labels: np.ndarray) -> str:
  """SHA-256 of labels as int32, little-endian, in index order (as ``skd_jax.data.identity``)."""
  return hashlib.sha256(np.asarray(labels, '<i4').tobytes()).hexdigest()


def wanted(data_config) -> bool:
  """Whether ``data_config`` asks for a subset or label noise."""
  return bool(data_config.get('train_examples', 0)) or bool(data_config.get('label_noise', 0.0))


def balanced_subset(labels: np.ndarray, num_classes: int, count: int, seed: int) -> np.ndarray:
  """``count / num_classes`` examples of every class, drawn uniformly without replacement.

  A permutation of the split from ``seed`` is taken, and each class's first ``count / C``
  examples in it are kept; a larger ``count`` with the same seed therefore keeps a superset.

  Args:
    labels: ``[M]`` integer labels of the whole split, in ``[0, num_classes)``.
    num_classes: ``C``.
    count: ``N``, a multiple of ``C``.
    seed: the subset's seed (``data.subset_seed``), >= 0.

  Returns:
    ``[N]`` int64 indices into the split, ascending.

  Raises:
    ConfigError: naming ``data.train_examples``, when ``N`` is not a multiple of ``C`` or a
      class has fewer than ``N / C`` examples.

  >>> balanced_subset(np.array([0, 1, 0, 1, 0, 1]), 2, 4, seed=0).shape
  (4,)
  """
  labels = np.asarray(labels)
  per_class, rest = divmod(count, num_classes)
  if rest:
    raise ConfigError(
        f'data.train_examples: {count} is not divisible by the {num_classes} classes; expected '
        f'a multiple of {num_classes} (the subset has the same number of examples per class)'
    )
  have = np.bincount(labels, minlength=num_classes)
  short = np.flatnonzero(have < per_class)
  if short.size:
    c = int(short[0])
    raise ConfigError(
        f'data.train_examples: {count} needs {per_class} examples of each of the {num_classes} '
        f'classes, but class {c} has {int(have[c])} in the split; expected at most '
        f'{int(have.min()) * num_classes}'
    )
  shuffled = np.random.default_rng((seed, _SUBSET)).permutation(len(labels))
  by_class = shuffled[np.argsort(labels[shuffled], kind='stable')]
  starts = np.cumsum(have) - have
  return np.sort(np.concatenate([by_class[s : s + per_class] for s in starts]))


def symmetric_noise(labels: np.ndarray, num_classes: int, rate: float, seed: int) -> np.ndarray:
  """Labels with exactly ``round(rate * N)`` (halves up) of them replaced by another class.

  The examples to change are the first of a permutation from ``seed``; each gets its label plus
  a shift drawn uniformly from ``1 .. C - 1`` (modulo ``C``): any other class, equally likely.

  Args:
    labels: ``[N]`` integer clean labels in ``[0, num_classes)``.
    num_classes: ``C`` >= 2.
    rate: the fraction of labels to change, in ``[0, 1)``.
    seed: the noise's seed (``data.noise_seed``), >= 0.

  Returns:
    ``[N]`` int32 noisy labels.

  >>> clean = np.arange(10) % 5
  >>> int(np.sum(symmetric_noise(clean, 5, 0.3, seed=0) != clean))
  3
  """
  labels = np.asarray(labels, np.int32)
  if num_classes < 2:
    raise ConfigError(f'data.label_noise: needs at least 2 classes, got {num_classes}')
  n = len(labels)
  changed = int(np.floor(rate * n + 0.5))
  rng = np.random.default_rng((seed, _NOISE))
  order = rng.permutation(n)[:changed]
  shift = rng.integers(1, num_classes, n)[:changed]  # drawn for all N: rates share their draws
  noisy = labels.copy()
  noisy[order] = (labels[order] + shift) % num_classes
  return noisy


class Selection(NamedTuple):
  """The training examples and labels a run trains on, chosen from a split of ``split_examples``.

  Attributes:
    indices: ``[N]`` indices into the split, ascending; its ``i``-th is the run's example ``i``.
    labels: ``[N]`` int32 labels trained on (with the noise).
    clean_labels: ``[N]`` int32 the split's labels of the same examples.
    split_examples: the number of examples in the split.
    subset_seed: ``data.subset_seed``, or None without a subset.
    noise_rate: ``data.label_noise``.
    noise_seed: ``data.noise_seed``, or None without noise.
  """

  indices: np.ndarray
  labels: np.ndarray
  clean_labels: np.ndarray
  split_examples: int
  subset_seed: int | None
  noise_rate: float
  noise_seed: int | None

  @property
  def flipped(self) -> int:
    """How many labels the noise changed."""
    return int(np.sum(self.labels != self.clean_labels))

  def identity(self) -> dict[str, Any]:
    """What ``data.json`` records besides the trained labels' identity: ``subset`` (the split's
    size, the seed, the SHA-256 of the indices as int32) and ``label_noise`` (the rate, the seed,
    the number of labels changed, the SHA-256 of the clean labels), each only when in use."""
    out = {}
    if self.subset_seed is not None:
      out['subset'] = {
          'of': self.split_examples,
          'seed': self.subset_seed,
          'indices_sha256': sha256(self.indices),
      }
    if self.noise_seed is not None:
      out['label_noise'] = {
          'rate': self.noise_rate,
          'seed': self.noise_seed,
          'flipped': self.flipped,
          'clean_labels_sha256': sha256(self.clean_labels),
      }
    return out

  def describe(self) -> str:
    """For the log: ``'; a class-balanced subset of 60,000 (seed 0); 20% symmetric label noise
    (seed 0): 200 labels changed'``, empty when neither is in use."""
    text = ''
    if self.subset_seed is not None:
      text += f'; a class-balanced subset of {self.split_examples:,} (seed {self.subset_seed})'
    if self.noise_seed is not None:
      text += (
          f'; {100 * self.noise_rate:g}% symmetric label noise (seed {self.noise_seed}): '
          f'{self.flipped:,} labels changed'
      )
    return text


def choose(data_config, labels: np.ndarray, num_classes: int) -> Selection:
  """The subset and the noisy labels ``data_config`` asks for, from the split's ``labels``.

  Raises:
    ConfigError: the subset cannot be drawn from this split.
  """
  labels = np.asarray(labels, np.int32)
  count = int(data_config.get('train_examples', 0))
  rate = float(data_config.get('label_noise', 0.0))
  subset_seed = noise_seed = None
  indices = np.arange(len(labels))
  if count:
    subset_seed = int(data_config.get('subset_seed', 0))
    indices = balanced_subset(labels, num_classes, count, subset_seed)
  clean = labels[indices]
  noisy = clean
  if rate:
    noise_seed = int(data_config.get('noise_seed', 0))
    noisy = symmetric_noise(clean, num_classes, rate, noise_seed)
  return Selection(indices, noisy, clean, len(labels), subset_seed, rate, noise_seed)


def select_dataset(data_config, dataset):
  """``dataset`` (a ``skd_jax.data.Dataset``) reduced to the chosen examples and labels, with
  ``selection`` set; the dataset itself when no option is in use."""
  if not wanted(data_config):
    return dataset
  chosen = choose(data_config, dataset.labels, dataset.num_classes)
  return dataset._replace(
      images=dataset.images[chosen.indices], labels=chosen.labels, selection=chosen
  )


class SelectedRecords:
  """Random access to the chosen examples of ``records`` (``skd_jax.data.open_records``), with
  the chosen labels: example ``i`` is the split's example ``selection.indices[i]``. Picklable."""

  def __init__(self, records, selection: Selection):
    self.records, self.selection = records, selection
    self.labels = selection.labels
    self.num_classes, self.image_shape = records.num_classes, records.image_shape

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, index: np.ndarray):
    """The images of the examples ``index`` (as ``records.read`` gives them) and their labels."""
    index = np.asarray(index)
    images, _ = self.records.read(self.selection.indices[index])
    return images, self.labels[index]


def select_records(data_config, records):
  """``records`` restricted to the chosen examples and labels (:class:`SelectedRecords`); the
  records themselves when no option is in use (their labels are then not read)."""
  if not wanted(data_config):
    return records
  return SelectedRecords(records, choose(data_config, records.labels, records.num_classes))
