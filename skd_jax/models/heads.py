"""Training-only auxiliary heads, the registry of head kinds, and the wrapper that attaches them.

A backbone with heads is called like any model:

    model = WithHeads(backbone, heads=(Head('drg', 'stage2', DRGHead(100)),))
    logits, outputs = model.apply(variables, x, train=train, mutable=...)

`logits` and `outputs` are the backbone's (including its feature maps
`outputs['stage<i>']`), plus, for every head, `outputs[name]` (its float32
logits) and `outputs[name + '/' + key]` for every other output the head
returns (at least `'features'`, its pooled feature vector). Every variable
collection is laid out as
`{'backbone': <the backbone's own variables>, <head name>: ..., ...}`, so the
inference model is `backbone.apply` on the `'backbone'` subtrees and has
exactly the backbone's parameters.

A head module reads one or several backbone outputs, `module(*maps,
train=train)`, and returns either `(logits, features)` or a dict with
`'logits'` and any other named arrays (features, refined feature maps,
attention maps).

Head kinds are a registry: `register_head(kind)` decorates a builder
`builder(backbone, request) -> module` (the request is a
`skd_jax.terms.HeadRequest`: `num_outputs`, `stages`, `options`), and
`build_head(backbone, request, term=...)` checks the stages and builds the
`Head` that `skd_jax.networks` attaches. The built-in kinds register
themselves where they are defined; a plug-in module registers its own kind on
import, and a term (built-in or plug-in) asks for it by name.

Built-in kinds:
  * `'drg'`, `DRGHead`: LightSKD's DRG head (from BYOT's journal code): a
    spatial attention gate followed by two stride-2 `SepConv`s.
  * `'later_stages'`, `ResNet.later_stages_head` /
    `PreActResNet.later_stages_head` (in `resnet`): HSAKD/LSSKD/BYOT heads that
    re-instantiate the backbone's later stages.
  * `'linear'`, `LinearHead`: global average pooling and one Dense layer
    (USKD's weak classifier).
  * `'frskd'`, `skd_jax.models.frskd.FRSKDHead`: FRSKD's self-teacher, a
    BiFPN over several stages with its own classifier.
  * `'mixskd'`, `skd_jax.models.mixskd.MixSKDHead`: MixSKD's branches on
    stages 1..N-1 (returning their final maps) and its self-teacher over them.
"""

from typing import Any, Callable, Dict, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax.errors import ConfigError

from skd_jax.models.resnet import batch_norm
from skd_jax.models.resnet import classifier
from skd_jax.models.resnet import CONV_INIT
from skd_jax.models.resnet import PAD_3X3

Array = jax.Array
Dtype = Any

# The parameter subtree that holds the backbone's variables.
_BACKBONE = 'backbone'


def _depthwise3x3(channels: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
  """Depthwise 3x3 convolution (one filter per channel), padding 1, no bias."""
  return nn.Conv(
      channels,
      (3, 3),
      strides=(strides, strides),
      padding=PAD_3X3,
      feature_group_count=channels,
      use_bias=False,
      kernel_init=CONV_INIT,
      dtype=dtype,
      name=name,
  )


def _pointwise(features: int, dtype: Dtype, name: str) -> nn.Conv:
  """1x1 convolution without bias (a BatchNorm follows)."""
  return nn.Conv(
      features,
      (1, 1),
      padding='VALID',
      use_bias=False,
      kernel_init=CONV_INIT,
      dtype=dtype,
      name=name,
  )


class SepConv(nn.Module):
  """Separable convolution block of BYOT/LightSKD, applied twice.

  With C the input channels:
  depthwise 3x3 (stride `strides`) -> pointwise 1x1 (C -> C) -> BN -> ReLU ->
  depthwise 3x3 (stride 1) -> pointwise 1x1 (C -> `features`) -> BN -> ReLU.
  Depthwise convs pad 1 on every side, so a stride-2 block maps H to
  ceil(H / 2).

  Attributes:
    features: Output channels.
    strides: Stride of the first depthwise convolution.
    dtype: Computation dtype; parameters stay float32.
  """

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    channels = x.shape[-1]
    x = _depthwise3x3(channels, self.strides, self.dtype, 'depthwise1')(x)
    x = _pointwise(channels, self.dtype, 'pointwise1')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    x = _depthwise3x3(channels, 1, self.dtype, 'depthwise2')(x)
    x = _pointwise(self.features, self.dtype, 'pointwise2')(x)
    return nn.relu(batch_norm(train, self.dtype, 'bn2')(x))


class DRGHead(nn.Module):
  """LightSKD's DRG auxiliary classifier (BYOT journal design).

  With x the [B, H, W, C] input (C is read from x, so the head follows the
  backbone's width at the stage it is attached to):

      a  = sigmoid(resize_HxW(ReLU(BN(SepConv(C, stride 2)(x)))))
      x' = a * x
      f  = mean_HW(SepConv(4C, stride 2)(SepConv(2C, stride 2)(x')))
      z  = Dense(f)

  The reference upsamples the attention map by 2 (bilinear, PyTorch's
  `align_corners=False`); here it is resized bilinearly to exactly H x W, which
  is the same map for even H, W and also works for odd sizes
  (7x7 -> 4x4 -> 7x7), where a x2 upsampling would give 8x8.

  Attributes:
    num_outputs: Number of logits.
    dtype: Computation dtype; parameters stay float32.
  """

  num_outputs: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Array]:
    """Returns float32 logits [B, num_outputs] and pooled features [B, 4C]."""
    x = x.astype(self.dtype)
    batch, height, width, channels = x.shape
    a = SepConv(channels, strides=2, dtype=self.dtype, name='attention_sepconv')(x, train=train)
    # SepConv already ends in BN + ReLU; the reference adds another pair.
    a = nn.relu(batch_norm(train, self.dtype, 'attention_bn')(a))
    a = jax.image.resize(a, (batch, height, width, channels), 'bilinear')
    x = nn.sigmoid(a) * x
    x = SepConv(2 * channels, strides=2, dtype=self.dtype, name='sepconv1')(x, train=train)
    x = SepConv(4 * channels, strides=2, dtype=self.dtype, name='sepconv2')(x, train=train)
    pooled = jnp.mean(x, axis=(1, 2))
    return classifier(self.num_outputs, self.dtype, pooled), pooled


class LinearHead(nn.Module):
  """Global average pooling, then a Dense layer: USKD's weak classifier.

  With x the [B, H, W, C] input: `f = mean_HW(x)`, `z = Dense(f)` (USKD's
  `nn.Linear(channel, num_classes)` on the pooled stage output; Flax's default
  init, as the backbone's classifier).

  Attributes:
    num_outputs: Number of logits.
    dtype: Computation dtype; parameters stay float32.
  """

  num_outputs: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Array]:
    """Returns float32 logits [B, num_outputs] and pooled features [B, C]."""
    del train
    pooled = jnp.mean(x.astype(self.dtype), axis=(1, 2))
    return classifier(self.num_outputs, self.dtype, pooled), pooled


# Kind name -> builder(backbone, request) -> unbound head module.
HeadBuilder = Callable[[nn.Module, Any], nn.Module]
_KINDS: Dict[str, HeadBuilder] = {}


def register_head(kind: str) -> Callable[[HeadBuilder], HeadBuilder]:
  """Decorator registering `builder(backbone, request) -> module` as head kind `kind`.

  The builder gets the unbound backbone (for its `dtype`, `num_stages`, ...)
  and the term's `skd_jax.terms.HeadRequest`; it returns an unbound module
  called as `module(*maps, train=train)` on the backbone's outputs
  `'stage<i>'` for `i` in `request.stages`, returning `(logits, features)` or
  a dict with `'logits'` and other named arrays. It may raise ConfigError
  (one line, without the field prefix: `build_head` adds `loss.<term>: `) or
  ValueError for an option it cannot take. Registering a kind again replaces
  the builder (a re-imported plug-in module).

  Example (a plug-in module, imported before the networks are built, e.g. by
  the term module that asks for the kind)::

    @skd_jax.models.register_head('mean_pool')
    def _mean_pool(backbone, request):
      return skd_jax.models.LinearHead(request.num_outputs, dtype=backbone.dtype)
  """
  if not isinstance(kind, str) or not kind:
    raise ValueError(f'heads: a kind is a non-empty string, got {kind!r}')

  def decorator(builder: HeadBuilder) -> HeadBuilder:
    _KINDS[kind] = builder
    return builder

  return decorator


def head_kinds() -> Tuple[str, ...]:
  """The registered head kinds, sorted."""
  return tuple(sorted(_KINDS))


class Head(NamedTuple):
  """An auxiliary head attached to backbone outputs.

  Attributes:
    name: Key of the head's logits in `outputs` and of its variables.
    stage: Key of the backbone output the head reads (e.g. `'stage2'`), or a
      tuple of keys for a head over several outputs (called with them in
      order).
    module: Unbound module called as `module(*maps, train=...)`, returning
      `(logits, features)` or a dict with `'logits'` and other arrays.
  """

  name: str
  stage: str | Tuple[str, ...]
  module: nn.Module

  @property
  def stages(self) -> Tuple[str, ...]:
    """The backbone outputs the head reads, in order."""
    return (self.stage,) if isinstance(self.stage, str) else tuple(self.stage)


def build_head(backbone: nn.Module, request: Any, *, term: str) -> Head:
  """The `Head` of kind `request.kind` on `request.stages` of `backbone`.

  Args:
    backbone: The unbound backbone (it must have `num_stages`).
    request: A `skd_jax.terms.HeadRequest`.
    term: The requesting term's name, for errors (`loss.<term>...`).

  Raises:
    ConfigError: An unknown kind (naming the known ones), a backbone without
      numbered stages, a stage out of range, or an option the builder refuses.
  """
  builder = _KINDS.get(request.kind)
  if builder is None:
    raise ConfigError(
        f'loss.{term}: unknown head kind {request.kind!r}; expected one of '
        f'{", ".join(head_kinds())} (or a kind registered with skd_jax.models.register_head)'
    )
  num_stages = getattr(backbone, 'num_stages', None)
  if num_stages is None:
    raise ConfigError(f'loss.{term}: model {type(backbone).__name__} has no numbered stages')
  stages = tuple(request.stages)
  field = 'stage' if len(stages) == 1 else 'stages'
  if not stages or not all(
      isinstance(i, int) and not isinstance(i, bool) and 1 <= i <= num_stages for i in stages
  ):
    shown = stages[0] if len(stages) == 1 else stages
    raise ConfigError(f'loss.{term}.{field}: expected a stage in 1..{num_stages}, got {shown}')
  try:
    module = builder(backbone, request)
  except ConfigError as e:
    raise ConfigError(f'loss.{term}: {e}') from None
  except ValueError as e:
    raise ConfigError(f'loss.{term}: head {request.name!r} ({request.kind}): {e}') from None
  keys = tuple(f'stage{i}' for i in stages)
  return Head(request.name, keys[0] if len(keys) == 1 else keys, module)


@register_head('drg')
def _drg(backbone: nn.Module, request: Any) -> nn.Module:
  return DRGHead(request.num_outputs, dtype=backbone.dtype)


@register_head('linear')
def _linear(backbone: nn.Module, request: Any) -> nn.Module:
  return LinearHead(request.num_outputs, dtype=backbone.dtype)


@register_head('later_stages')
def _later_stages(backbone: nn.Module, request: Any) -> nn.Module:
  if not hasattr(backbone, 'later_stages_head'):
    raise ConfigError(
        f'model {type(backbone).__name__} cannot re-instantiate its later stages as heads'
    )
  return backbone.later_stages_head(request.stages[-1], request.num_outputs)


def _check_head_names(heads: Sequence[Head]) -> None:
  """Raises ValueError for duplicate head names or the reserved name."""
  names = [head.name for head in heads]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f'heads: duplicate head names {duplicates}')
  if _BACKBONE in names:
    raise ValueError(f'heads: the name {_BACKBONE!r} is reserved for the ' 'backbone')


def _named_outputs(name: str, result: Any) -> Dict[str, Array]:
  """A head's result as `{'logits': ..., key: ...}`."""
  if isinstance(result, dict):
    if 'logits' not in result:
      raise ValueError(f"heads: head {name!r} returned a dict without 'logits'")
    return dict(result)
  logits, features = result
  return {'logits': logits, 'features': features}


class WithHeads(nn.Module):
  """A backbone with training-only auxiliary heads on its named outputs.

  Runs the backbone (variables under `'backbone'`), then each head on
  `outputs[s] for s in head.stages` (variables under `head.name`), and returns
  the backbone's logits and its outputs extended with `outputs[head.name]`
  (float32 logits) and `outputs[head.name + '/' + key]` for the head's other
  outputs (`'features'`, ...). Gradients of head losses flow into the
  backbone.

  Attributes:
    backbone: Unbound model returning `(logits, outputs)`.
    heads: Auxiliary heads, applied in order.
  """

  backbone: nn.Module
  heads: Tuple[Head, ...] = ()

  # Linen names a module passed as an attribute after the attribute
  # ('backbone'), unless `flax_preserve_adopted_names` is set, in which case it
  # would keep the backbone's own name. Pin the documented layout.
  preserve_adopted_names = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_head_names(self.heads)
    logits, backbone_outputs = self.backbone(x, train=train)
    outputs = dict(backbone_outputs)
    for head in self.heads:
      for stage in head.stages:
        if stage not in backbone_outputs:
          raise ValueError(
              f'heads: head {head.name!r} reads {stage!r}, not an output of '
              f'the backbone; expected one of {", ".join(backbone_outputs)}'
          )
      # Linen has already adopted `head.module` under an attribute-path name
      # (e.g. 'heads_0_module'), which is never called; this clone owns the
      # head's variables under the head's own name.
      module = head.module.clone(parent=self, name=head.name)
      found = _named_outputs(
          head.name, module(*(backbone_outputs[s] for s in head.stages), train=train)
      )
      named = {
          (head.name if key == 'logits' else f'{head.name}/{key}'): value
          for key, value in found.items()
      }
      for key in named:
        if key in backbone_outputs:
          raise ValueError(
              f'heads: head {head.name!r} would overwrite the ' f'backbone output {key!r}'
          )
      named[head.name] = named[head.name].astype(jnp.float32)
      outputs.update(named)
    return logits, outputs
