"""ResNets for CIFAR-, MNIST- and ImageNet-sized images.

Every model is called as

    logits, outputs = model.apply(variables, x, train=train, mutable=...)

with `x` a float NHWC batch of normalized images. `logits` is float32 of shape
[batch, num_classes] whatever the computation dtype. `outputs` maps names to
intermediates: `'stem'` (after the stem), `'stage1'`, `'stage2'`, ... (each
stage's output feature map), `'feature_map'` (the map that is pooled: the last
stage's output, after the final BN + ReLU of the pre-activation ResNet) and
`'features'` (the globally pooled vector fed to the classifier). Auxiliary heads are attached to these names, so they are part
of the interface.

Architectures:
  * `ResNet`: post-activation ResNet with BasicBlocks; `cifar_resnet18` and
    `small_resnet` build its two configurations.
  * `PreActResNet`: pre-activation ResNet (He et al. 2016, "Identity Mappings
    in Deep Residual Networks") as used by PS-KD; `preact_resnet18` builds it.
  * `ImageNetResNet`: torchvision's ImageNet ResNet (7x7/2 stem and 3x3/2
    max-pool, Bottleneck blocks with the stride on the 3x3 conv, "v1.5");
    `resnet50` and `resnet152` build it.

All have `num_stages` and `later_stages_head(stage, num_outputs)`, which
builds an HSAKD/LSSKD auxiliary head (the later stages again, pooled, Dense)
for use with `heads.WithHeads`.

BatchNorm uses no `axis_name`: under `jax.jit` with a data-sharded batch the
statistics are those of the global batch.
"""

import functools
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Kaiming normal (untruncated, std sqrt(2 / fan_out)), as torchvision
# initializes ResNet convolutions.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Convolutions feed BatchNorm (or are summed before one), so a bias would be
# redundant with the BN shift.
_Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=CONV_INIT)

# Explicit symmetric padding: 'SAME' pads stride-2 convs on even inputs only at
# the bottom/right, which would shift the sampling grid relative to the
# PyTorch reference (padding=1).
PAD_3X3 = ((1, 1), (1, 1))


def _conv3x3(features: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
  """3x3 convolution with padding 1 and no bias."""
  return _Conv(
      features, (3, 3), strides=(strides, strides), padding=PAD_3X3, dtype=dtype, name=name
  )


def _conv1x1(features: int, strides: int, dtype: Dtype, name: str) -> nn.Conv:
  """1x1 projection convolution with no bias."""
  return _Conv(
      features, (1, 1), strides=(strides, strides), padding='VALID', dtype=dtype, name=name
  )


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  """BatchNorm matching PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
  )


def classifier(num_classes: int, dtype: Dtype, pooled: Array) -> Array:
  """Final Dense layer; logits are returned in float32.

  The Dense keeps Flax's default init (lecun normal kernel, zero bias) rather
  than PyTorch's uniform one; both give unit-scale logits at init.
  """
  logits = nn.Dense(num_classes, dtype=dtype, name='head')(pooled)
  return logits.astype(jnp.float32)


def _check_stages(
    stage_sizes: Sequence[int], widths: Sequence[int], strides: Sequence[int]
) -> None:
  """Raises ValueError unless there is one width and one stride per stage."""
  if not stage_sizes:
    raise ValueError('stage_sizes: expected at least one stage')
  if not len(stage_sizes) == len(widths) == len(strides):
    raise ValueError(
        f'stage_sizes/widths/strides: expected equal lengths, got '
        f'{len(stage_sizes)}/{len(widths)}/{len(strides)}'
    )


def apply_stages(
    block: Any,
    x: Array,
    *,
    train: bool,
    stages: Sequence[Tuple[int, int, int]],
    first_stage: int,
    dtype: Dtype,
) -> List[Array]:
  """Applies residual stages to `x`; call it inside an `nn.compact` method.

  Stage `first_stage + k` is `stages[k] = (num_blocks, width, stride)`:
  `num_blocks` blocks of `width` channels, the first with `stride`. Blocks are
  named `stage<i>_block<j>` (1-based), so the backbone and the heads that
  re-instantiate its later stages name their parameters alike.

  Returns:
    Each stage's output feature map, in order.
  """
  outputs = []
  for i, (size, width, stride) in enumerate(stages, start=first_stage):
    for j in range(size):
      x = block(width, stride if j == 0 else 1, dtype=dtype, name=f'stage{i}_block{j + 1}')(
          x, train=train
      )
    outputs.append(x)
  return outputs


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
    out = nn.relu(batch_norm(train, self.dtype, 'bn1')(out))
    out = _conv3x3(self.features, 1, self.dtype, 'conv2')(out)
    out = batch_norm(train, self.dtype, 'bn2')(out)
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, self.dtype, 'shortcut_conv')(x)
      shortcut = batch_norm(train, self.dtype, 'shortcut_bn')(shortcut)
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
    preact = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = _conv1x1(self.features, self.strides, self.dtype, 'shortcut_conv')(preact)
    else:
      shortcut = x
    out = _conv3x3(self.features, self.strides, self.dtype, 'conv1')(preact)
    out = nn.relu(batch_norm(train, self.dtype, 'bn2')(out))
    out = _conv3x3(self.features, 1, self.dtype, 'conv2')(out)
    return out + shortcut


class Bottleneck(nn.Module):
  """torchvision's post-activation bottleneck block ("ResNet v1.5").

  conv1x1(`features`)-BN-ReLU-conv3x3(`features`, stride)-BN-ReLU-
  conv1x1(4 * `features`)-BN + shortcut, ReLU. The stride sits on the 3x3
  conv. The shortcut is the identity, or a 1x1 conv + BN projection when the
  stride or the number of channels changes. The last BN's scale starts at one
  (torchvision's default `zero_init_residual=False`).
  """

  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32

  EXPANSION = 4

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    out_features = self.features * self.EXPANSION
    out = _conv1x1(self.features, 1, self.dtype, 'conv1')(x)
    out = nn.relu(batch_norm(train, self.dtype, 'bn1')(out))
    out = _conv3x3(self.features, self.strides, self.dtype, 'conv2')(out)
    out = nn.relu(batch_norm(train, self.dtype, 'bn2')(out))
    out = _conv1x1(out_features, 1, self.dtype, 'conv3')(out)
    out = batch_norm(train, self.dtype, 'bn3')(out)
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = _conv1x1(out_features, self.strides, self.dtype, 'shortcut_conv')(x)
      shortcut = batch_norm(train, self.dtype, 'shortcut_bn')(shortcut)
    else:
      shortcut = x
    return nn.relu(out + shortcut)


class _StagedNet:
  """Stage count and HSAKD-style head constructor shared by the ResNets.

  Subclasses are Linen modules with `stage_sizes`, `widths`, `strides` and
  `dtype` fields and set `_BLOCK` (their residual block) and `_FINAL_BN`
  (whether a BN + ReLU follows the last stage). This mixin is not a Module, so
  Linen does not wrap its methods and they work on unbound backbones.
  """

  @property
  def num_stages(self) -> int:
    """Number of residual stages; `outputs` has `'stage1'` ... `'stage<N>'`."""
    return len(self.stage_sizes)

  def _stages_to_logits(
      self, x: Array, outputs: Dict[str, Array], *, train: bool
  ) -> Tuple[Array, Dict[str, Array]]:
    """From the stem's output: the stages, the final BN + ReLU (pre-activation
    only), pooling and the classifier; adds `'stage<i>'`, `'feature_map'` and
    `'features'` to `outputs`. Called inside the subclass's compact `__call__`."""
    stage_outputs = apply_stages(
        self._BLOCK,
        x,
        train=train,
        stages=tuple(zip(self.stage_sizes, self.widths, self.strides)),
        first_stage=1,
        dtype=self.dtype,
    )
    for i, stage_output in enumerate(stage_outputs, start=1):
      outputs[f'stage{i}'] = stage_output
    x = stage_outputs[-1]
    if self._FINAL_BN:
      x = nn.relu(batch_norm(train, self.dtype, 'final_bn')(x))
    # The classifier applied at every location of this map gives dense predictions (Zipf's LS).
    outputs['feature_map'] = x
    pooled = jnp.mean(x, axis=(1, 2))
    outputs['features'] = pooled
    return classifier(self.num_classes, self.dtype, pooled), outputs

  def later_stages_head(self, stage: int, num_outputs: int) -> 'LaterStagesHead':
    """Auxiliary head on stage `stage`'s output (HSAKD/LSSKD).

    The head re-instantiates stages `stage + 1` ... `N` with this backbone's
    block type, stage sizes, widths, strides and dtype. For `stage == N` it
    instead applies one extra stage of `stage_sizes[-1]` blocks of width
    `widths[-1]` and stride 1, as HSAKD's CIFAR ResNets do. (With Bottleneck
    blocks a stage of width w outputs 4 * w channels.) Then, for the
    pre-activation ResNet, the final BN + ReLU; then global average pooling
    and a Dense layer with `num_outputs` outputs.

    Args:
      stage: 1-based stage whose output the head reads, in 1..`num_stages`.
      num_outputs: Number of logits (4 * num_classes for HSAKD's joint
        class x rotation task).

    Returns:
      An unbound module called as `logits, features = head(x, train=train)`
      with float32 `logits` [batch, num_outputs] and the pooled `features`
      [batch, C] (C the last stage's output channels).

    Raises:
      ValueError: If `stage` is not in 1..`num_stages`.
    """
    n = self.num_stages
    if isinstance(stage, bool) or not isinstance(stage, int) or not 1 <= stage <= n:
      raise ValueError(f'stage: expected 1..{n}, got {stage!r}')
    if stage < n:
      stages = tuple(zip(self.stage_sizes, self.widths, self.strides))[stage:]
    else:
      stages = ((self.stage_sizes[-1], self.widths[-1], 1),)
    return LaterStagesHead(
        block=self._BLOCK,
        stages=stages,
        first_stage=stage + 1,
        final_bn=self._FINAL_BN,
        num_outputs=num_outputs,
        dtype=self.dtype,
    )


class LaterStagesHead(nn.Module):
  """Residual stages, optional final BN + ReLU, global average pool, Dense.

  Built by the ResNets' `later_stages_head`.
  Blocks are named `stage<i>_block<j>` from `first_stage` on, like the
  backbone's blocks for the same stages.

  Attributes:
    block: Residual block class, called as `block(width, stride, dtype=...)`.
    stages: `(num_blocks, width, stride)` of each stage.
    first_stage: 1-based number of the first stage, used in block names.
    final_bn: Whether a BN + ReLU follows the last stage (pre-activation).
    num_outputs: Number of logits.
    dtype: Computation dtype; parameters stay float32.
    return_map: Also return the final (unpooled) feature map, third (MixSKD's branches).
  """

  block: Any
  stages: Sequence[Tuple[int, int, int]]
  first_stage: int
  final_bn: bool
  num_outputs: int
  dtype: Dtype = jnp.float32
  return_map: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, ...]:
    """Returns float32 logits [batch, num_outputs] and pooled features (and, with `return_map`,
    the map they were pooled from)."""
    x = apply_stages(
        self.block,
        x,
        train=train,
        stages=self.stages,
        first_stage=self.first_stage,
        dtype=self.dtype,
    )[-1]
    if self.final_bn:
      x = nn.relu(batch_norm(train, self.dtype, 'final_bn')(x))
    pooled = jnp.mean(x, axis=(1, 2))
    logits = classifier(self.num_outputs, self.dtype, pooled)
    return (logits, pooled, x) if self.return_map else (logits, pooled)


class ResNet(_StagedNet, nn.Module):
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

  _BLOCK = BasicBlock
  _FINAL_BN = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_stages(self.stage_sizes, self.widths, self.strides)
    outputs = {}
    x = _conv3x3(self.widths[0], 1, self.dtype, 'stem_conv')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'stem_bn')(x))
    outputs['stem'] = x
    return self._stages_to_logits(x, outputs, train=train)


class PreActResNet(_StagedNet, nn.Module):
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

  _BLOCK = PreActBlock
  _FINAL_BN = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_stages(self.stage_sizes, self.widths, self.strides)
    outputs = {}
    x = _conv3x3(self.widths[0], 1, self.dtype, 'stem_conv')(x)
    outputs['stem'] = x
    return self._stages_to_logits(x, outputs, train=train)


class ImageNetResNet(_StagedNet, nn.Module):
  """torchvision's ImageNet ResNet with Bottleneck blocks.

  Stem: 7x7 stride-2 conv (padding 3) with `stem_width` filters, BN, ReLU,
  3x3 stride-2 max-pool (padding 1); `outputs['stem']` is the max-pool's
  output. Then stage `i` has `stage_sizes[i]` Bottlenecks of inner width
  `widths[i]` (output 4 * `widths[i]` channels), the first with stride
  `strides[i]`. Then global average pooling and a Dense classifier. A 224x224
  input gives 56, 28, 14 and 7 pixel stage outputs.

  Attributes:
    num_classes: Number of logits.
    stage_sizes: Number of blocks per stage.
    widths: Inner (bottleneck) channels per stage.
    strides: Stride of the first block of each stage.
    stem_width: Filters of the 7x7 stem convolution.
    dtype: Computation dtype; parameters stay float32.
  """

  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int] = (64, 128, 256, 512)
  strides: Sequence[int] = (1, 2, 2, 2)
  stem_width: int = 64
  dtype: Dtype = jnp.float32

  _BLOCK = Bottleneck
  _FINAL_BN = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Tuple[Array, Dict[str, Array]]:
    _check_stages(self.stage_sizes, self.widths, self.strides)
    outputs = {}
    x = _Conv(
        self.stem_width,
        (7, 7),
        strides=(2, 2),
        padding=((3, 3), (3, 3)),
        dtype=self.dtype,
        name='stem_conv',
    )(x)
    x = nn.relu(batch_norm(train, self.dtype, 'stem_bn')(x))
    # Max-pooling pads with -inf, as PyTorch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outputs['stem'] = x
    return self._stages_to_logits(x, outputs, train=train)


def resnet50(*, num_classes: int, dtype: Dtype = jnp.float32) -> ImageNetResNet:
  """ImageNet ResNet-50, [3, 4, 6, 3] Bottlenecks: 25,557,032 parameters with
  1000 classes, as torchvision's `resnet50` (BN running statistics excluded)."""
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), dtype=dtype)


def resnet152(*, num_classes: int, dtype: Dtype = jnp.float32) -> ImageNetResNet:
  """ImageNet ResNet-152, [3, 8, 36, 3] Bottlenecks: 60,192,808 parameters with
  1000 classes, as torchvision's `resnet152` (BN running statistics excluded)."""
  return ImageNetResNet(num_classes=num_classes, stage_sizes=(3, 8, 36, 3), dtype=dtype)


def cifar_resnet18(*, num_classes: int, dtype: Dtype = jnp.float32) -> ResNet:
  """CIFAR ResNet-18: 3x3 stem, no max-pool, [2, 2, 2, 2] blocks of 64..512.

  11,220,132 parameters with 100 classes (BN running statistics excluded).
  """
  return ResNet(
      num_classes=num_classes,
      stage_sizes=(2, 2, 2, 2),
      widths=(64, 128, 256, 512),
      strides=(1, 2, 2, 2),
      dtype=dtype,
  )


def preact_resnet18(*, num_classes: int, dtype: Dtype = jnp.float32) -> PreActResNet:
  """PreAct ResNet-18 as in PS-KD: 11,218,340 parameters with 100 classes."""
  return PreActResNet(num_classes=num_classes, dtype=dtype)


def small_resnet(
    *,
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
    strides: Sequence[int] = (1, 2, 2),
    dtype: Dtype = jnp.float32,
) -> ResNet:
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
    raise ValueError(f'blocks_per_stage: expected a positive integer, got {blocks_per_stage}')
  strides = tuple(strides)
  if len(strides) != 3:
    raise ValueError(f'strides: expected 3 stage strides, got {strides}')
  return ResNet(
      num_classes=num_classes,
      stage_sizes=(blocks_per_stage,) * 3,
      widths=widths,
      strides=strides,
      dtype=dtype,
  )
