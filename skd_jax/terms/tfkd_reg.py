"""TF-KD (reg): a manually designed virtual teacher (Yuan et al., CVPR 2020).

The teacher is built from the label alone (:func:`skd_jax.losses.tfkd_reg_targets`): no network,
no extra pass, no state. The hard-label part is a separate ``cross_entropy`` term. The official
loss ``(1 - alpha) CE + alpha m KL_mean`` (PyTorch's ``KLDivLoss()`` divides by ``B x C``) is
``cross_entropy`` with weight ``1 - alpha`` plus this term with weight ``alpha m / C``
(configs/tfkd_reg.py).
"""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class TFKDReg(terms.LossTerm):
  """``weight * KL(softmax(u / T) || softmax(z))``, ``u`` = ``a`` on ``y``, ``(1-a)/(C-1)`` else."""

  weight: float = 0.1
  correct_prob: float = terms.setting(0.99, low=0, high=1)
  temperature: float = terms.setting(20.0, low=1e-3, high=1e3)
  name: str = 'tfkd_reg'

  def __call__(self, inputs, rows=None, carry=None):
    return terms.TermOutput(
        losses.tfkd_reg_loss(
            inputs.logits,
            inputs.one_hot,
            correct_prob=self.correct_prob,
            temperature=self.temperature,
        )
    )
