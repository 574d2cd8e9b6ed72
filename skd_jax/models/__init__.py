"""Model registry.

All models share one calling convention:

    logits, outputs = model.apply(variables, x, train=train, mutable=...)

where `logits` is float32 [batch, num_classes] and `outputs` holds the named
intermediates `'stem'`, `'stage1'`, ..., `'feature_map'`, `'features'` (see
`resnet`).
`WithHeads` (see `heads`) wraps a backbone with training-only auxiliary heads
that add their logits (and other named outputs) to `outputs`; its variables hold the backbone's
own under `'backbone'`. Head kinds are a registry (`register_head`, `head_kinds`, `build_head`).

A model from outside skd_jax is named by import path, `config.model.module = 'mylab.nets'`
(`skd_jax.plugins`): the module's `make(*, num_classes, dtype, **options)` plays the part of a
`MODELS` constructor, and `config.model.name` is then only a label. Its model follows the same
convention; its final Dense layer must be named `'head'` for the terms that apply it to other
features (SD-Dropout), `'feature_map'` (the map pooled into `'features'`) only by terms that
classify every location (Zipf's LS), and numbered stages (`num_stages`) only by terms that attach
heads to them.

`ModelSpec` (`spec`) names one model with its options, classes, input shape and input
normalisation: what the trainer builds, `skd_jax.networks` instantiates and `skd_jax.export` stores
beside the variables.
"""

import inspect
from typing import Any, Callable, Dict

import flax.linen as nn
import jax.numpy as jnp

from skd_jax import plugins
from skd_jax.errors import ConfigError
from skd_jax.models.frskd import FRSKDHead
from skd_jax.models.heads import build_head
from skd_jax.models.heads import DRGHead
from skd_jax.models.heads import Head
from skd_jax.models.heads import head_kinds
from skd_jax.models.heads import LinearHead
from skd_jax.models.heads import register_head
from skd_jax.models.heads import SepConv
from skd_jax.models.heads import WithHeads
from skd_jax.models.mixskd import MixSKDHead
from skd_jax.models.mixskd import MixSKDTeacher
from skd_jax.models.resnet import BasicBlock
from skd_jax.models.resnet import Bottleneck
from skd_jax.models.resnet import cifar_resnet18
from skd_jax.models.resnet import ImageNetResNet
from skd_jax.models.resnet import preact_resnet18
from skd_jax.models.resnet import PreActBlock
from skd_jax.models.resnet import PreActResNet
from skd_jax.models.resnet import ResNet
from skd_jax.models.resnet import resnet152
from skd_jax.models.resnet import resnet50
from skd_jax.models.resnet import small_resnet
from skd_jax.models.spec import ModelSpec

# Name -> constructor taking keyword arguments `num_classes`, `dtype` and any
# architecture options.
MODELS: Dict[str, Callable[..., nn.Module]] = {
    'cifar_resnet18': cifar_resnet18,
    'preact_resnet18': preact_resnet18,
    'resnet50': resnet50,
    'resnet152': resnet152,
    'small_resnet': small_resnet,
}


def _is_positive_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_option(key: str, value: Any, default: Any) -> None:
  """Raises ConfigError unless `value` is of the kind of `default`.

  Every architecture option is a count, width or stride: a positive integer
  or a sequence of them.
  """
  if isinstance(default, int) and not _is_positive_int(value):
    raise ConfigError(f'model.{key}: expected a positive integer, got {value!r:.80}')
  if isinstance(default, tuple) and not (
      isinstance(value, (tuple, list)) and all(map(_is_positive_int, value))
  ):
    raise ConfigError(f'model.{key}: expected a sequence of positive integers, got {value!r:.80}')


def get_model(
    name: str, *, num_classes: int, dtype: Any = jnp.float32, module: str = '', **kwargs: Any
) -> nn.Module:
  """Builds the model registered under `name`, or the one of the plug-in `module`.

  Args:
    name: A key of `MODELS` (with `module`, only a label).
    module: '' or the import path of a module whose `make` builds the model.
    num_classes: Number of logits.
    dtype: Computation dtype; parameters stay float32.
    **kwargs: Architecture options of that constructor (e.g. `widths` and
      `blocks_per_stage` for `'small_resnet'`).

  Returns:
    The (unbound) Flax module.

  Raises:
    ConfigError: If the name is unknown, an option is not accepted by that
      model, or an option value is invalid; `module` does not import, has no
      `make`, or its `make` returns no Flax module.
  """
  if module:
    constructor = plugins.load(module, 'model.module')
    name = module
  elif name not in MODELS:
    raise ConfigError(
        f'model.name: unknown model {name!r}; expected one of {", ".join(sorted(MODELS))}, or '
        "model.module='mylab.nets' (an import path)"
    )
  else:
    constructor = MODELS[name]
  parameters = inspect.signature(constructor).parameters
  for key, value in kwargs.items():
    if key not in parameters:
      options = sorted(set(parameters) - {'num_classes', 'dtype'})
      raise ConfigError(
          f'model.{key}: not an option of model {name!r}; expected one of '
          f'{", ".join(options) or "(no options)"}'
      )
    _check_option(key, value, parameters[key].default)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ConfigError(f'model.num_classes: expected a positive integer, got {num_classes!r}')
  if module:
    plugins.check_call(constructor, 'model.module', num_classes=num_classes, dtype=dtype, **kwargs)
  try:
    model = constructor(num_classes=num_classes, dtype=dtype, **kwargs)
  except ValueError as e:
    # Constructors phrase their errors as "<option>: <expectation>".
    raise ConfigError(f'model.{e}') from e
  if not isinstance(model, nn.Module):
    raise ConfigError(
        f'model.module: make() returned {type(model).__name__}; expected a flax.linen.Module'
    )
  return model


__all__ = [
    'BasicBlock',
    'Bottleneck',
    'DRGHead',
    'FRSKDHead',
    'Head',
    'ImageNetResNet',
    'LinearHead',
    'MODELS',
    'MixSKDHead',
    'MixSKDTeacher',
    'ModelSpec',
    'PreActBlock',
    'PreActResNet',
    'ResNet',
    'SepConv',
    'WithHeads',
    'build_head',
    'cifar_resnet18',
    'get_model',
    'head_kinds',
    'preact_resnet18',
    'register_head',
    'resnet152',
    'resnet50',
    'small_resnet',
]
