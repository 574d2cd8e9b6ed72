"""A run's data from its ``config.data``: the training source, the test set and what the model
needs to know of them, the same way for both pipelines.

``skd_jax.data.open(config.data, mesh, eval_batch_size)`` returns :class:`Splits`. With
``data.pipeline = 'device'`` the whole training split is loaded (``skd_jax.data.load_split``), the
subset and label noise applied (``skd_jax.data.selection``), and the test split put on every device
(``skd_jax.data.sources.DeviceEvalSet``); with ``'host'`` both splits are opened for random access
and read while training (``skd_jax.data.streaming``, imported only then: grain costs most of a
second of start-up).
"""

from typing import Any

import numpy as np

from skd_jax.data import pipeline
from skd_jax.data import selection as selection_lib
from skd_jax.data import sources


class Splits:
  """The training set and test set of a run.

  Attributes:
    train: the training set: a ``skd_jax.data.Dataset`` (device pipeline) or random-access
      records (host pipeline); both have ``labels`` (the labels trained on, noisy ones included)
      and ``num_classes``.
    test: ``skd_jax.data.sources.DeviceEvalSet`` or ``skd_jax.data.streaming.HostEvalSet``.
    image_shape: ``(H, W, C)`` of the model's input.
    mean, std: per-channel statistics of the training images as the model sees them at
      evaluation (the model's input normalisation).
    selection: the subset and label noise applied (``skd_jax.data.selection.Selection``), or None.
  """

  def __init__(self, data_config, mesh, eval_batch_size: int):
    # A copy: what opened the data builds its source, whatever happens to the config later.
    self._config, self._mesh = data_config.copy_and_resolve_references(), mesh
    if data_config.pipeline == 'host':
      from skd_jax.data import streaming  # pylint: disable=g-import-not-at-top

      self.train, self.test, shape, (mean, std) = streaming.open_splits(
          data_config, mesh, eval_batch_size
      )
    else:
      from skd_jax import data as data_lib  # pylint: disable=g-import-not-at-top

      train = data_lib.load_split(data_config, data_config.train_split)
      self.train = selection_lib.select_dataset(data_config, train)  # data.train_examples, ...
      mean, std = pipeline.channel_stats(self.train.images)
      shape = self.train.images.shape[1:]
      test = data_lib.load_split(data_config, data_config.test_split)
      self.test = sources.DeviceEvalSet(
          sources.to_devices(test.images, test.labels, mesh), eval_batch_size
      )
    self.image_shape = tuple(int(n) for n in shape)
    self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  @property
  def labels(self) -> np.ndarray:
    return self.train.labels

  @property
  def selection(self) -> Any:
    return getattr(self.train, 'selection', None)

  def source(self, *, seed: int, batch_size: int, groups: tuple[str, ...] = ()):
    """The training batches (``skd_jax.data.sources``): an ``OnDeviceSource`` or, with the host
    pipeline, a ``streaming.HostSource`` with ``data.workers``, ``prefetch`` and
    ``timeout_seconds``; augmented as ``data.augment`` / ``crop_padding`` / ``flip`` say."""
    data = self._config
    options = dict(
        seed=seed,
        batch_size=batch_size,
        groups=groups,
        crop_padding=data.crop_padding,
        flip=data.flip,
    )
    if data.pipeline == 'host':
      from skd_jax.data import streaming  # pylint: disable=g-import-not-at-top

      return streaming.HostSource(
          self.train,
          self._mesh,
          augment=data.augment,
          image_size=data.image_size,
          workers=data.workers,
          prefetch=data.prefetch,
          timeout_seconds=data.timeout_seconds,
          **options,
      )
    return sources.OnDeviceSource(
        self.train.images, self.train.labels, self.num_classes, self._mesh, **options
    )
