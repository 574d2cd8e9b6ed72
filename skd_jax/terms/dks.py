"""DKS: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019; arXiv 1906.00675).

Auxiliary classifier branches on the shallow stages (``first_stage`` .. N-1 of an N-stage
backbone) learn from the labels, and every classifier, the student's own final one
(``inputs.logits``) included, is matched to every other one by a temperature-softened KL with the
other side stopped: :func:`skd_jax.losses.dks_loss`. The final classifier's cross-entropy is the
separate ``cross_entropy`` term. Gradients of the branches flow into the backbone. Branches exist
only in training; evaluation and export use the backbone alone.

Branches: the ``'later_stages'`` kind (``ResNet.later_stages_head``): stages ``i+1 .. N``
re-instantiated with the backbone's block type, stage sizes and widths, then global average
pooling and a Dense layer with C outputs. Where the reference codes differ (docs/methods.md, DKS):
winycg/Self-KD-Lib @ ede3062 (``CIFAR_ResNet18_dks``, ``branch_layers=[[1, 2], [2]]``) gives the
branch on stage 2 a stage-3 copy of one block where ours has the backbone's two, and builds every
stage of pre-activation blocks without a final BN + ReLU; the authors' WRN (sundw2014/DKS @
2853541) gives the branch on stage 1 a last stage of half the blocks and the branch on stage 2 a
last stage of twice the width. The authors' KL smooths both distributions by 1e-8 (``epsilon``;
0, Self-KD-Lib's, by default).
"""

import dataclasses
import re

import jax.numpy as jnp

from skd_jax import errors
from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class DKS(terms.LossTerm):
  """``weight * dks_loss(z, [z_1 .. z_K], y)`` with branches ``dks<i>`` on ``stage<i>``."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  temperature: float = 4.0
  t2_scaling: bool = True
  synergy_weight: float = 1.0
  epsilon: float = 0.0
  first_stage: int = 1
  name: str = 'dks'

  def heads(self):
    # One branch per shallow stage; the final classifier is the student's own.
    return tuple(
        terms.HeadRequest(f'{self.name}{i}', i, 'later_stages', self.num_classes)
        for i in range(self.first_stage, self.num_stages)
    )

  def _head_names(self, outputs):
    pattern = re.compile(rf'{re.escape(self.name)}(\d+)')
    found = [(int(m.group(1)), k) for k in outputs if (m := pattern.fullmatch(k))]
    return [k for _, k in sorted(found)]

  def __call__(self, inputs, rows=None, carry=None):
    names = self._head_names(inputs.outputs)
    head_logits = [inputs.outputs[k] for k in names]
    loss = losses.dks_loss(
        inputs.logits,
        head_logits,
        inputs.one_hot,
        temperature=self.temperature,
        t2_scaling=self.t2_scaling,
        synergy_weight=self.synergy_weight,
        epsilon=self.epsilon,
    )
    metrics = {
        f'{k}/top1': 100.0 * (jnp.argmax(z, -1) == inputs.labels).astype(jnp.float32)
        for k, z in zip(names, head_logits)
    }
    return terms.TermOutput(loss, metrics=metrics)


def make(settings, context):
  if not context.num_stages or context.num_stages < 2:
    raise errors.ConfigError('loss.dks: the model needs at least 2 numbered stages for branches')
  first = settings.get('first_stage', 1)
  if isinstance(first, bool) or not isinstance(first, int) or not 1 <= first < context.num_stages:
    raise errors.ConfigError(
        f'loss.dks.first_stage: expected an integer in [1, {context.num_stages - 1}], '
        f'got {first!r}'
    )
  t2 = settings.get('t2_scaling', True)
  if not isinstance(t2, bool):
    raise errors.ConfigError(f'loss.dks.t2_scaling: expected True or False, got {t2!r}')
  check = lambda key, low, high: terms.check_range(
      settings, key, low, high, 'dks', getattr(DKS, key)
  )
  return DKS(
      num_classes=context.num_classes,
      num_stages=context.num_stages,
      weight=float(settings.weight),
      temperature=check('temperature', 1e-3, 1e3),
      t2_scaling=t2,
      synergy_weight=check('synergy_weight', 0, 1e3),
      epsilon=check('epsilon', 0, 1e-2),
      first_stage=first,
  )
