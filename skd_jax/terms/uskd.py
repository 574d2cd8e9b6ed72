"""USKD: universal self-knowledge distillation (Yang et al., ICCV 2023; arXiv 2303.13005).

The final head learns, besides its cross-entropy (a separate ``cross_entropy`` term), a target
term whose soft label is the example's squared target probability shifted to a batch mean of 1,
and a normalized non-target term (a softmax over the non-target logits) whose soft labels are
Zipf weights over a ranking of the classes. The ranking mixes the final head with a weak linear
classifier (global average pooling and a Dense layer, ``skd_jax.models.LinearHead``, built by
``skd_jax.networks``) on an intermediate stage, trained with label-smoothed cross-entropy. See
:func:`skd_jax.losses.uskd_loss`. The head exists only in training; evaluation and export use the
backbone alone.

Official code: github.com/yzd-v/cls_KD @ 1e5d48f (branch ``1.0``; ``master`` @ ad4876f has the
same loss), ``mmcls/models/dis_losses/uskd.py``, called from ``distiller.py`` L171-179 on the
pooled output of the backbone's second-to-last stage.
"""

import dataclasses

import jax.numpy as jnp

from skd_jax import errors
from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class USKD(terms.LossTerm):
  """``weight * uskd_loss(z, w, y)`` with ``w = inputs.outputs['uskd']``, the weak head.

  ``stage`` None means the backbone's second-to-last stage (the official ``fea_s[-2]``: stage 3
  of a ResNet-18); :meth:`check` resolves it. ``group_size`` 0 takes the mean of the target term
  over the whole (global) batch; the official code takes it over each GPU's batch (16 images in
  its CIFAR-100 runs on 8 GPUs): set 16 to reproduce that on any number of devices. ``rank_mix``
  ``'probs'`` ranks with the final head's probabilities instead of the official log-probabilities.
  """

  num_classes: int
  weight: float = 1.0
  alpha: float = terms.setting(0.1, low=0, high=1e3)
  beta: float = terms.setting(0.1, low=0, high=1e3)
  mu: float = terms.setting(0.1, low=0, high=1e3)
  stage: int | None = terms.setting(None, low=1)  # at most the backbone's stages (check)
  group_size: int = terms.setting(0, low=0)  # a divisor of the batch size (check)
  rank_mix: str = terms.setting('official', choices=('official', 'probs'))
  name: str = 'uskd'

  def check(self, context):
    if not context.num_stages:
      raise errors.ConfigError(
          f'loss.{self.name}: the model has no numbered stages to attach the head to'
      )
    stage = max(context.num_stages - 1, 1) if self.stage is None else self.stage
    if stage > context.num_stages:
      raise errors.ConfigError(
          f'loss.{self.name}.stage: expected an integer in [1, {context.num_stages}], got {stage!r}'
      )
    size = self.group_size
    if size and context.batch_size % size:
      raise errors.ConfigError(
          f'loss.{self.name}.group_size: {size} does not divide the batch size '
          f'{context.batch_size}'
      )
    return dataclasses.replace(self, stage=stage)

  def heads(self):
    return (terms.HeadRequest(self.name, self.stage, 'linear', self.num_classes),)

  def __call__(self, inputs, rows=None, carry=None):
    weak = inputs.outputs[self.name]
    loss = losses.uskd_loss(
        inputs.logits,
        weak,
        inputs.labels,
        alpha=self.alpha,
        beta=self.beta,
        mu=self.mu,
        valid=inputs.valid,
        group_size=self.group_size,
        rank_mix=self.rank_mix,
    )
    top1 = 100.0 * (jnp.argmax(weak, -1) == inputs.labels).astype(jnp.float32)
    return terms.TermOutput(loss, metrics={'uskd/top1': top1})
