"""MixSKD's training-only network: branches on the shallow stages and a self-teacher over the exits.

Yang et al., "MixSKD: Self-Knowledge Distillation from Mixup for Image Recognition", ECCV 2022
(arXiv 2208.05768); the official ``resnet_mixskd.py`` of winycg/Self-KD-Lib @ ede3062 as
described in METHODS.md §3.11, written from that description. Registered as the head kind
``'mixskd'`` over the backbone's stages ``1 .. N``:

    branch k = 1 .. N-1:  F_k = stages k+1 .. N again (fresh weights) on stage k's map,
                          z_k = Dense_k(mean_HW(F_k))          (the backbone's later_stages_head)
    F_N = the backbone's stage-N map,   z_N = the backbone's own logits
    h(F_1 .. F_N) = Dense(mean_HW(Conv1x1(concat_channels(F_1 .. F_N))))

The self-teacher's 1x1 convolution maps the ``N`` concatenated maps to the last stage's width
with no bias, no BatchNorm and no ReLU, so ``h`` is affine in its input maps: for
``lam + (1 - lam) = 1``, ``h(lam F + (1 - lam) F[perm]) = lam h(F) + (1 - lam) h(F)[perm]``
exactly (up to rounding), which is how the term gets the teacher of the mixture of maps from the
teacher of the originals without a second call (``skd_jax.terms.mixskd``).
"""

from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from skd_jax.errors import ConfigError
from skd_jax.models import heads
from skd_jax.models.resnet import classifier
from skd_jax.models.resnet import CONV_INIT

Array = jax.Array
Dtype = Any


class MixSKDTeacher(nn.Module):
  """MixSKD's self-teacher ``h``: concatenation, 1x1 conv (no bias), global pool, Dense.

  Attributes:
    num_outputs: Number of logits.
    width: Output channels of the 1x1 convolution (the backbone's last width).
    dtype: Computation dtype; parameters stay float32.
  """

  num_outputs: int
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, maps: Sequence[Array]) -> Tuple[Array, Array]:
    """Returns float32 logits ``[B, num_outputs]`` and the pooled ``[B, width]`` features of the
    ``[B, H, W, D_k]`` maps (all of one spatial size)."""
    x = jnp.concatenate([m.astype(self.dtype) for m in maps], axis=-1)
    x = nn.Conv(
        self.width,
        (1, 1),
        padding='VALID',
        use_bias=False,
        kernel_init=CONV_INIT,
        dtype=self.dtype,
        name='conv',
    )(x)
    pooled = jnp.mean(x, axis=(1, 2))
    return classifier(self.num_outputs, self.dtype, pooled), pooled


class MixSKDHead(nn.Module):
  """MixSKD's branches and self-teacher, called on the backbone's stage maps ``1 .. N``.

  Returns a dict: ``'logits'`` (the self-teacher's over the originals' ``F_1 .. F_N``),
  ``'features'`` (its pooled features), and for each branch ``k = 1 .. N-1`` its float32 logits
  ``'branch<k>'`` and final map ``'map<k>'``.

  Attributes:
    branches: Unbound ``LaterStagesHead`` modules with ``return_map`` (branch ``k`` reads stage
      ``k``), from the backbone's ``later_stages_head``.
    num_outputs: Number of logits of the self-teacher.
    dtype: Computation dtype; parameters stay float32.
  """

  branches: Tuple[nn.Module, ...]
  num_outputs: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, *maps: Array, train: bool) -> Dict[str, Array]:
    if len(maps) != len(self.branches) + 1:
      raise ValueError(f'mixskd head: expected {len(self.branches) + 1} stage maps')
    found, final_maps = {}, []
    for k, branch in enumerate(self.branches, start=1):
      # The attribute was adopted under an attribute-path name and is never called; this clone
      # owns the branch's variables under 'branch<k>' (as WithHeads does with its heads).
      logits, _, final = branch.clone(parent=self, name=f'branch{k}')(maps[k - 1], train=train)
      found[f'branch{k}'] = logits.astype(jnp.float32)
      found[f'map{k}'] = final
      final_maps.append(final)
    final_maps.append(maps[-1])
    width = maps[-1].shape[-1]  # the backbone's last stage's output channels
    logits, pooled = MixSKDTeacher(self.num_outputs, width, self.dtype, name='teacher')(final_maps)
    return {'logits': logits, 'features': pooled, **found}


@heads.register_head('mixskd')
def _mixskd(backbone: nn.Module, request: Any) -> nn.Module:
  """The head over ``request.stages``, which must be ``1 .. N`` of the backbone."""
  n = backbone.num_stages
  if tuple(request.stages) != tuple(range(1, n + 1)) or n < 2:
    raise ValueError(f'the mixskd head reads stages 1..{n} (at least 2), got {request.stages}')
  if not hasattr(backbone, 'later_stages_head'):
    raise ConfigError(
        f'model {type(backbone).__name__} cannot re-instantiate its later stages as branches'
    )
  branches = tuple(
      backbone.later_stages_head(k, request.num_outputs).clone(return_map=True) for k in range(1, n)
  )
  return MixSKDHead(branches, request.num_outputs, dtype=backbone.dtype)
