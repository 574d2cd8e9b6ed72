"""ResNets for CIFAR-sized and MNIST-sized images.

Every model is called as

    logits, outputs = model.apply(variables, x, train=train, mutable=...)

with `x` a float NHWC batch of normalized images. `logits` is float32 of shape
[batch, num_classes] whatever the computation dtype. `outputs` maps names to
intermediates: `'stem'` (after the stem), `'stage1'`, `'stage2'`, ... (each
stage's output feature map) and `'features'` (the globally pooled vector fed to
the classifier). Auxiliary heads are attached to these names, so they are part
of the interface.

Architectures:
  * `ResNet`: post-activation ResNet with BasicBlocks; `cifar_resnet18` and
    `small_resnet` build its two configurations.
  * `PreActResNet`: pre-activation ResNet (He et al. 2016, "Identity Mappings
    in Deep Residual Networks") as used by PS-KD; `preact_resnet18` builds it.

BatchNorm uses no `axis_name`: under `jax.jit` with a data-sharded batch the
statistics are those of the global batch.
"""

import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Kaiming normal (untruncated, std sqrt(2 / fan_out)), as torchvision
# initializes ResNet convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Convolutions feed BatchNorm (or are summed before one), so a bias would be
# redundant with the BN shift.
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_CONV_INIT)

# Explicit symmetric padding: 'SAME' pads stride-2 convs on even inputs only at
# the bottom/right, which would shift the sampling grid relative to the
# PyTorch reference (padding=1).
_PAD_3X3 = ((1, 1), (1, 1))


def _conv3x3(features: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
  """3x3 convolution with padding 1 and no bias."""
  return _Conv(features, (3, 3), strides=(strides, strides), padding=_PAD_3X3,
               dtype=dtype, name=name)


def _conv1x1(features: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
  """1x1 projection convolution with no bias."""
  return _Conv(features, (1, 1), strides=(strides, strides), padding='VALID',
               dtype=dtype, name=name)


def _batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm matching PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def _classifier(num_classes: int, dtype: Dtype, pooled: Array) -> Array:
  """Final Dense layer; logits are returned in float32.

  The Dense keeps Flax's default init (lecun normal kernel, zero bias) rather
  than PyTorch's uniform one; both give unit-scale logits at init.
  """
  logits = nn.Dense(num_classes, dtype=dtype, name='head')(pooled)
  return logits.astype(jnp.float32)


def _check_stages(stage_sizes: Sequence[int], widths: Sequence[int],
                  strides: Sequence[int]) -> None:
  """Raises ValueError unless there is one width and one stride per stage."""
  if not stage_sizes:
    raise ValueError('stage_sizes: expected at least one stage')
  if not len(stage_sizes) == len(widths) == len(strides):
    raise ValueError(
        f'stage_sizes/widths/strides: expected equal lengths, got '
        f'{len(stage_sizes)}/{len(widths)}/{len(strides)}')


class BasicBlock(nn.Module):
  """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU.

  The shortcut is the identity, or a 1x1 conv + BN projection when the stride
  or the number of channels changes.
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    out = _conv3x3(self.features, self.strides, self.dtype, 'conv1')(x)
    out = nn.relu(_batch_norm(train, self.dtype, 'bn1')(out))
    out = _conv3x3(self.features, 1, self.dtype, 'conv2')(out)
    out = _batch_norm(train, self.dtype, 'bn2')(out)
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, self.dtype,
                          'shortcut_conv')(x)
      shortcut = _batch_norm(train, self.dtype, 'shortcut_bn')(shortcut)
    else:
      shortcut = x
    return nn.relu(out + shortcut)


class PreActBlock(nn.Module):
  """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

  The shortcut is the identity on the raw input, or, when the stride or the
  number of channels changes, a 1x1 conv (no BN) on the pre-activated input.
  """
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    preact = nn.relu(_batch_norm(train, self.dtype, 'bn1')(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, self.dtype,
                          'shortcut_conv')(preact)
    else:
      shortcut = x
    out = _conv3x3(self.features, self.strides, self.dtype, 'conv1')(preact)
    out = nn.relu(_batch_norm(train, self.dtype, 'bn2')(out))
    out = _conv3x3(self.features, 1, self.dtype, 'conv2')(out)
    return out + shortcut


class ResNet(nn.Module):
  """Post-activation ResNet of BasicBlocks without a max-pool.

  Stem: 3x3 stride-1 conv with `widths[0]` filters, BN, ReLU. Then stage `i`
  (1-based in `outputs`) has `stage_sizes[i]` BasicBlocks of width `widths[i]`,
  the first with stride `strides[i]`. Then global average pooling and a Dense
  classifier.

  Attributes:
    num_classes: Number of logits.
    stage_sizes: Number of blocks per stage.
    widths: Output channels per stage.
    strides: Stride of the first block of each stage.
    dtype: Computation dtype; parameters stay float32.
  """
  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  strides: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *,
               train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_stages(self.stage_sizes, self.widths, self.strides)
    outputs = {}
    x = _conv3x3(self.widths[0], 1, self.dtype, 'stem_conv')(x)
    x = nn.relu(_batch_norm(train, self.dtype, 'stem_bn')(x))
    outputs['stem'] = x
    for i, (size, width, stride) in enumerate(
        zip(self.stage_sizes, self.widths, self.strides), start=1):
      for j in range(size):
        x = BasicBlock(width, stride if j == 0 else 1, dtype=self.dtype,
                       name=f'stage{i}_block{j + 1}')(x, train=train)
      outputs[f'stage{i}'] = x
    pooled = jnp.mean(x, axis=(1, 2))
    outputs['features'] = pooled
    return _classifier(self.num_classes, self.dtype, pooled), outputs


class PreActResNet(nn.Module):
  """Pre-activation ResNet (PS-KD's PreAct ResNet-18 by default).

  Stem: a bare 3x3 stride-1 conv with `widths[0]` filters. Then stages of
  PreActBlocks, a final BN + ReLU, global average pooling and a Dense
  classifier. `outputs['stage<i>']` are the raw (not yet activated) block
  outputs; `outputs['features']` is pooled after the final BN + ReLU.

  Attributes:
    num_classes: Number of logits.
    stage_sizes: Number of blocks per stage.
    widths: Output channels per stage.
    strides: Stride of the first block of each stage.
    dtype: Computation dtype; parameters stay float32.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  strides: Sequence[int] = (1, 2, 2, 2)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *,
               train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_stages(self.stage_sizes, self.widths, self.strides)
    outputs = {}
    x = _conv3x3(self.widths[0], 1, self.dtype, 'stem_conv')(x)
    outputs['stem'] = x
    for i, (size, width, stride) in enumerate(
        zip(self.stage_sizes, self.widths, self.strides), start=1):
      for j in range(size):
        x = PreActBlock(width, stride if j == 0 else 1, dtype=self.dtype,
                        name=f'stage{i}_block{j + 1}')(x, train=train)
      outputs[f'stage{i}'] = x
    x = nn.relu(_batch_norm(train, self.dtype, 'final_bn')(x))
    pooled = jnp.mean(x, axis=(1, 2))
    outputs['features'] = pooled
    return _classifier(self.num_classes, self.dtype, pooled), outputs


def cifar_resnet18(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """CIFAR ResNet-18: 3x3 stem, no max-pool, [2, 2, 2, 2] blocks of 64..512.

  11,220,132 parameters with 100 classes (BN running statistics excluded).
  """
  return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2),
                widths=(64, 128, 256, 512), strides=(1, 2, 2, 2), dtype=dtype)


def preact_resnet18(*, num_classes: int,
                    dtype: Dtype = jnp.float32) -> PreActResNet:
  """PreAct ResNet-18 as in PS-KD: 11,218,340 parameters with 100 classes."""
  return PreActResNet(num_classes=num_classes, dtype=dtype)


def small_resnet(*, num_classes: int, widths: Sequence[int] = (16, 32, 64),
                 blocks_per_stage: int = 1, strides: Sequence[int] = (1, 2, 2),
                 dtype: Dtype = jnp.float32) -> ResNet:
  """Small 3-stage ResNet (strides 1/2/2 by default) that trains fast on a CPU.

  Meant for 28x28x1 Fashion-MNIST; 77,754 parameters with the defaults and 10
  classes.

  Args:
    num_classes: Number of logits.
    widths: Channels of the three stages; the stem uses `widths[0]`.
    blocks_per_stage: BasicBlocks in each stage.
    strides: Strides of the three stages; (2, 2, 2) runs the first stage at
      half resolution, about 3x cheaper on 28x28 inputs.
    dtype: Computation dtype.

  Raises:
    ValueError: If `widths` does not have three entries or `blocks_per_stage`
      is not positive.
  """
  widths = tuple(widths)
  if len(widths) != 3:
    raise ValueError(f'widths: expected 3 stage widths, got {widths}')
  if not isinstance(blocks_per_stage, int) or blocks_per_stage < 1:
    raise ValueError(
        f'blocks_per_stage: expected a positive integer, got {blocks_per_stage}')
  strides = tuple(strides)
  if len(strides) != 3:
    raise ValueError(f'strides: expected 3 stage strides, got {strides}')
  return ResNet(num_classes=num_classes, stage_sizes=(blocks_per_stage,) * 3,
                widths=widths, strides=strides, dtype=dtype)
