"""Image classification data from NumPy files, as a data source from outside skd_jax.

  config.data.module = 'skd_plugins.npz_data'
  config.data.dir = '/data/mylab'  # holds train.npz and test.npz (data.train_split, test_split)

Each ``SPLIT.npz`` holds ``images``, uint8 ``[N, H, W, C]`` (or ``[N, H, W]`` for grayscale), and
``labels``, integers ``[N]``; optionally ``num_classes`` (else the largest label + 1, which must
then be the same in every split). Row ``i`` is the example with index ``i``, as skd_jax requires.
"""

import os

import numpy as np

from skd_jax import data
from skd_jax.errors import ConfigError


def make(data_config, split: str) -> data.Dataset:
  """The whole split ``split`` read from ``data_config.dir``/``split``.npz."""
  path = os.path.join(data_config.dir, f'{split}.npz')
  if not os.path.isfile(path):
    raise ConfigError(f'data.dir: no file {path}; expected {split}.npz with images and labels')
  with np.load(path) as arrays:
    images, labels = arrays['images'], arrays['labels'].astype(np.int32)
    if 'num_classes' in arrays:
      num_classes = int(arrays['num_classes'])
    else:
      num_classes = int(labels.max()) + 1
  if images.ndim == 3:
    images = images[..., None]
  return data.Dataset(images, labels, num_classes)
