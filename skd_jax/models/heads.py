"""Training-only auxiliary heads and the wrapper that attaches them to a backbone.

A backbone with heads is called like any model:

    model = WithHeads(backbone, heads=(Head('drg', 'stage2', DRGHead(100)),))
    logits, outputs = model.apply(variables, x, train=train, mutable=...)

`logits` and `outputs` are the backbone's, plus, for every head,
`outputs[name]` (its float32 logits) and `outputs[name + '/features']` (its
pooled feature vector). Every variable collection is laid out as
`{'backbone': <the backbone's own variables>, <head name>: ..., ...}`, so the
inference model is `backbone.apply` on the `'backbone'` subtrees and has
exactly the backbone's parameters.

Heads:
  * `DRGHead`: LightSKD's DRG head (from BYOT's journal code): a spatial
    attention gate followed by two stride-2 `SepConv`s.
  * `ResNet.later_stages_head` / `PreActResNet.later_stages_head` (in
    `resnet`): HSAKD/LSSKD heads that re-instantiate the backbone's later
    stages.
  * `LinearHead`: global average pooling and one Dense layer (USKD's weak
    classifier).
"""

from typing import Any, Dict, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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


class Head(NamedTuple):
  """An auxiliary head attached to a backbone output.

  Attributes:
    name: Key of the head's logits in `outputs` and of its variables.
    stage: Key of the backbone output the head reads (e.g. `'stage2'`).
    module: Unbound module called as `logits, features = module(x, train=...)`.
  """

  name: str
  stage: str
  module: nn.Module


def _check_head_names(heads: Sequence[Head]) -> None:
  """Raises ValueError for duplicate head names or the reserved name."""
  names = [head.name for head in heads]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f'heads: duplicate head names {duplicates}')
  if _BACKBONE in names:
    raise ValueError(f'heads: the name {_BACKBONE!r} is reserved for the ' 'backbone')


class WithHeads(nn.Module):
  """A backbone with training-only auxiliary heads on its named outputs.

  Runs the backbone (variables under `'backbone'`), then each head on
  `outputs[head.stage]` (variables under `head.name`), and returns the
  backbone's logits and its outputs extended with `outputs[head.name]` (float32
  logits) and `outputs[head.name + '/features']`. Gradients of head losses
  flow into the backbone.

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
      if head.stage not in backbone_outputs:
        raise ValueError(
            f'heads: head {head.name!r} reads {head.stage!r}, not an output of '
            f'the backbone; expected one of {", ".join(backbone_outputs)}'
        )
      for key in (head.name, f'{head.name}/features'):
        if key in backbone_outputs:
          raise ValueError(
              f'heads: head {head.name!r} would overwrite the ' f'backbone output {key!r}'
          )
      # Linen has already adopted `head.module` under an attribute-path name
      # (e.g. 'heads_0_module'), which is never called; this clone owns the
      # head's variables under the head's own name.
      module = head.module.clone(parent=self, name=head.name)
      head_logits, features = module(backbone_outputs[head.stage], train=train)
      outputs[head.name] = head_logits.astype(jnp.float32)
      outputs[f'{head.name}/features'] = features
    return logits, outputs
