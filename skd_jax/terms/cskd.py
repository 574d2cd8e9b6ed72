"""CS-KD: class-wise self-knowledge distillation (Yun et al., CVPR 2020).

Every anchor has a partner: another training example of the same class, drawn uniformly with
replacement (it may be the anchor itself) by the source's partner sampler from ``(seed, step)``,
independently augmented. The student's prediction on the partner, from a forward pass without
gradient, teaches its prediction on the anchor. As in the reference code, the partner pass is a
separate call in train mode: its BatchNorm batch statistics are its own, and it updates the
running statistics after the anchors' pass. The anchors' cross-entropy is a separate
``cross_entropy`` term.
"""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class CSKD(terms.LossTerm):
  """``weight * T^2 KL(softmax(sg(z(x'))/T) || softmax(z(x)/T))``; weight is lambda."""

  weight: float = 1.0
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  name: str = 'cskd'
  forwards = (terms.Forward('partner', group='partner', network='student', grad=False),)

  def __call__(self, inputs, rows=None, carry=None):
    partner = inputs.passes['partner']
    return terms.TermOutput(
        losses.distillation_kl(inputs.logits, partner.logits, temperature=self.temperature)
    )
