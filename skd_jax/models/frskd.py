"""FRSKD's self-teacher: a BiFPN over the backbone's stage features with its own classifier.

Ji et al., "Refine Myself by Teaching Myself: Feature Refinement via Self-Knowledge
Distillation", CVPR 2021 (arXiv 2103.08273); the official ``BiFPNc`` of MingiJi/FRSKD @ 98b87e5
(``classification/models/bifpnc.py``, with ``DepthConvBlock`` and ``MaxPool2dStaticSamePadding``
of ``models/utils.py``), written from its description. Registered as the head kind ``'frskd'``.

With the L stage maps ``x_1 .. x_L`` it reads (highest resolution first, channels ``c_i``), one
BiFPN layer (``repeat`` of them, the first with lateral convolutions) computes, with ``w`` the
width multiplier, ``r = ReLU`` and fusion weights normalised as ``v = r(v) / (sum r(v) + 1e-6)``:

    l_i  = Lat_i(r(x_i))                       1x1 conv -> BN -> ReLU, c_i -> w c_i
    t_i  = Lat2_i(r(x_i))  (i > 1)             another 1x1 block on the raw input
    td_L = l_L
    td_i = Up_i(v0 r(l_i) + v1 Ups_i(r(td_{i+1})))                  i = L-1 .. 1
    o_1  = td_1
    o_i  = Down_i(v0 r(t_i) + v1 r(td_i) + v2 Dns_i(r(o_{i-1})))   1 < i < L
    o_L  = Down_L(v0 r(t_L) + v1 Dns_L(r(o_{L-1})))
    refined_i = r(o_i);   z_t = Dense(mean_HW(refined_L))

``Up_i`` / ``Down_i`` are depth-``depth`` separable blocks (depthwise 3x3 -> pointwise -> BN,
then ``depth - 1`` times ReLU -> depthwise -> pointwise -> BN); ``Ups_i`` is nearest upsampling to
``x_i``'s size then a 1x1 block; ``Dns_i`` a 3x3 stride-2 max-pool with TensorFlow-style "same"
padding then a 1x1 block.

Differences from the official code:

* upsampling is nearest to the exact size of the finer map (PyTorch's ``size=`` rule,
  ``src = floor(dst * in / out)``) where the official uses ``scale_factor=2``: the same for even
  sizes, and it also works for odd ones (4 -> 7), where the official would fail;
* the max-pool pads with -inf where the official pads with zeros: the same, since its input is
  after a ReLU;
* with ``repeat > 1`` the later layers' lateral blocks take the previous layer's width (Flax
  infers input channels); the official declares the backbone's widths there and cannot run.

Initialisation is PyTorch's default for these layers (``U(+-1/sqrt(fan_in))`` for convolution
kernels and the Dense layer's kernel and bias, BN scale 1 and bias 0, fusion weights 1), as the
official code does not re-initialise them.
"""

import math
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skd_jax.models import heads
from skd_jax.models.resnet import batch_norm

Array = jax.Array
Dtype = Any

# PyTorch's default for Conv2d and Linear kernels: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
_EPSILON = 1e-6  # the official fusion-weight epsilon


def _torch_bias_init(fan_in: int):
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _conv(features: int, kernel: int, dtype: Dtype, name: str, groups: int = 1) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=groups,
      use_bias=False,
      kernel_init=TORCH_INIT,
      dtype=dtype,
      name=name,
  )


class ConvBlock(nn.Module):
  """FRSKD's ``DepthConvBlock``: a 1x1 conv -> BN -> ReLU, or ``depth`` separable 3x3 convs.

  ``kernel == 1``: ``ReLU(BN(conv1x1(x)))``. ``kernel == 3``: depthwise 3x3 (padding 1) ->
  pointwise 1x1 -> BN, then ``depth - 1`` times ReLU -> depthwise -> pointwise -> BN (no final
  ReLU).

  Attributes:
    features: Output channels.
    kernel: 1 or 3.
    depth: Separable convolutions (3x3 only).
    dtype: Computation dtype; parameters stay float32.
  """

  features: int
  kernel: int = 1
  depth: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if self.kernel == 1:
      x = _conv(self.features, 1, self.dtype, 'conv')(x)
      return nn.relu(batch_norm(train, self.dtype, 'bn')(x))
    for d in range(self.depth):
      if d:
        x = nn.relu(x)
      x = _conv(x.shape[-1], self.kernel, self.dtype, f'depthwise{d}', groups=x.shape[-1])(x)
      x = _conv(self.features, 1, self.dtype, f'pointwise{d}')(x)
      x = batch_norm(train, self.dtype, f'bn{d}')(x)
    return x


def upsample_nearest(x: Array, size: Tuple[int, int]) -> Array:
  """``[B, h, w, C]`` -> ``[B, H, W, C]`` with PyTorch's nearest rule ``floor(i * h / H)``."""
  (h, w), (height, width) = x.shape[1:3], size
  rows = np.floor(np.arange(height) * h / height).astype(np.int32)
  cols = np.floor(np.arange(width) * w / width).astype(np.int32)
  return x[:, rows][:, :, cols]


def max_pool_same(x: Array) -> Array:
  """3x3 stride-2 max-pool with TensorFlow-style "same" padding: ``H -> ceil(H / 2)``."""
  pads = []
  for n in x.shape[1:3]:
    extra = max((math.ceil(n / 2) - 1) * 2 - n + 3, 0)
    pads.append((extra // 2, extra - extra // 2))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=tuple(pads))


def _fusion_weights(name: str, module: nn.Module, n: int) -> Array:
  w = nn.relu(module.param(name, nn.initializers.ones, (n,), jnp.float32))
  return w / (jnp.sum(w) + _EPSILON)


class BiFPNLayer(nn.Module):
  """One FRSKD BiFPN layer (see the module docstring); levels are 0-based here.

  Attributes:
    widths: Output channels of each level.
    first: Whether this is the first layer (with the lateral ``Lat_i`` blocks).
    depth: Depth of the ``Up`` / ``Down`` separable blocks (and of the lateral ones, which at 1x1
      have one convolution whatever the depth).
    dtype: Computation dtype; parameters stay float32.
  """

  widths: Tuple[int, ...]
  first: bool = True
  depth: int = 2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Array], *, train: bool) -> List[Array]:
    n, r, dt = len(inputs), nn.relu, self.dtype
    block = lambda features, name, kernel=1: ConvBlock(
        features, kernel, self.depth if kernel == 3 else 1, dtype=dt, name=name
    )
    trans = [None] + [
        block(self.widths[i], f'trans{i}')(r(inputs[i]), train=train) for i in range(1, n)
    ]
    if self.first:
      inputs = [block(self.widths[i], f'lat{i}')(r(x), train=train) for i, x in enumerate(inputs)]
    top_down = [None] * (n - 1) + [inputs[-1]]
    for i in range(n - 2, -1, -1):
      w = _fusion_weights(f'up_weight{i}', self, 2)
      coarse = upsample_nearest(r(top_down[i + 1]), inputs[i].shape[1:3])
      coarse = block(self.widths[i], f'up_sample{i}')(coarse, train=train)
      fused = w[0] * r(inputs[i]) + w[1] * coarse
      top_down[i] = block(self.widths[i], f'up_conv{i}', 3)(fused, train=train)
    out = [top_down[0]]
    for i in range(1, n):
      w = _fusion_weights(f'down_weight{i}', self, 3 if i < n - 1 else 2)
      fine = block(self.widths[i], f'down_sample{i}')(max_pool_same(r(out[-1])), train=train)
      if i < n - 1:
        fused = w[0] * r(trans[i]) + w[1] * r(top_down[i]) + w[2] * fine
      else:
        fused = w[0] * r(trans[i]) + w[1] * fine
      out.append(block(self.widths[i], f'down_conv{i}', 3)(fused, train=train))
    return [r(o) for o in out]


class FRSKDHead(nn.Module):
  """FRSKD's self-teacher (the official ``BiFPNc``) over several stage maps.

  Called as ``head(*maps, train=train)`` with the maps of ``stages`` (highest resolution first);
  returns ``{'logits': [B, num_outputs] float32, 'features': [B, w c_L] pooled,
  'stage<s>': [B, H_s, W_s, w c_s] refined map}`` for every stage ``s`` it reads.

  Attributes:
    num_outputs: Number of logits.
    stages: The backbone stage numbers of the maps, for the output names.
    width: Channel multiplier ``w`` of the refined maps (official ``--width``, 2).
    depth: Depth of the separable blocks (official ``--depth``, 2).
    repeat: Number of BiFPN layers (official ``--repeat``, 1).
    dtype: Computation dtype; parameters stay float32.
  """

  num_outputs: int
  stages: Tuple[int, ...]
  width: int = 2
  depth: int = 2
  repeat: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, *maps: Array, train: bool) -> Dict[str, Array]:
    if len(maps) != len(self.stages) or len(maps) < 2:
      raise ValueError(f'frskd head: expected one map per stage of {self.stages} (at least 2)')
    widths = tuple(self.width * x.shape[-1] for x in maps)
    refined = [x.astype(self.dtype) for x in maps]
    for k in range(self.repeat):
      refined = BiFPNLayer(widths, k == 0, self.depth, self.dtype, name=f'bifpn{k}')(
          refined, train=train
      )
    pooled = jnp.mean(nn.relu(refined[-1]), axis=(1, 2))
    logits = nn.Dense(
        self.num_outputs,
        dtype=self.dtype,
        kernel_init=TORCH_INIT,
        bias_init=_torch_bias_init(pooled.shape[-1]),
        name='head',
    )(pooled)
    found = {'logits': logits.astype(jnp.float32), 'features': pooled}
    found.update({f'stage{s}': f for s, f in zip(self.stages, refined)})
    return found


def _positive_option(options: Dict[str, Any], key: str, default: int) -> int:
  value = options.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{key}: expected a positive integer, got {value!r}')
  return value


@heads.register_head('frskd')
def _frskd(backbone: nn.Module, request: Any) -> FRSKDHead:
  options = dict(request.options)
  unknown = sorted(set(options) - {'width', 'depth', 'repeat'})
  if unknown:
    raise ValueError(f'unknown options {unknown}; expected width, depth, repeat')
  if len(request.stages) < 2:
    raise ValueError('a self-teacher reads at least 2 stages')
  return FRSKDHead(
      request.num_outputs,
      stages=tuple(request.stages),
      width=_positive_option(options, 'width', 2),
      depth=_positive_option(options, 'depth', 2),
      repeat=_positive_option(options, 'repeat', 1),
      dtype=backbone.dtype,
  )
