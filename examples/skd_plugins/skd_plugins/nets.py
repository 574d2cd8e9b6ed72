"""A small CNN as a model from outside skd_jax (``config.model.module = 'skd_plugins.nets'``).

It follows skd_jax's model convention (``skd_jax.models``): ``model.apply(variables, x, train=...)``
returns float32 logits ``[B, num_classes]`` and a dict of named intermediates, ``'stage1'``,
``'stage2'``, ..., ``'feature_map'`` and ``'features'`` (its pooled ``[B, D]`` mean), and the final
Dense layer is named ``'head'``. Each stage is a 3x3 convolution, BatchNorm and ReLU; the model
options are ``widths`` (one per stage) and ``strides``.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
  """Conv-BN-ReLU stages, global average pooling and a Dense ``head``."""

  num_classes: int
  widths: Sequence[int] = (16, 32)
  strides: Sequence[int] = (1, 2)
  dtype: Any = jnp.float32

  @property
  def num_stages(self) -> int:
    return len(self.widths)

  @nn.compact
  def __call__(self, x, train: bool = False):
    outputs = {}
    for i, (width, stride) in enumerate(zip(self.widths, self.strides), start=1):
      x = nn.Conv(width, (3, 3), (stride, stride), use_bias=False, dtype=self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x)
      x = nn.relu(x)
      outputs[f'stage{i}'] = x
    outputs['feature_map'] = x  # what is pooled into the features (Zipf's LS votes over it)
    features = jnp.mean(x, axis=(1, 2))
    outputs['features'] = features
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(features)
    return logits.astype(jnp.float32), outputs


def make(*, num_classes: int, dtype: Any, widths=(16, 32), strides=(1, 2)) -> SmallCNN:
  """The model from ``num_classes``, ``dtype`` and the config's ``model.widths`` /
  ``model.strides``; raises ValueError as ``'<option>: <expectation>'``, as skd_jax's do."""
  if len(strides) != len(widths):
    raise ValueError(f'strides: expected one per width ({len(widths)}), got {tuple(strides)}')
  return SmallCNN(num_classes, tuple(widths), tuple(strides), dtype)
