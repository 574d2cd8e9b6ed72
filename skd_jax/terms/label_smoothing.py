"""Label smoothing (Szegedy et al., CVPR 2016) on the final head."""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class LabelSmoothing(terms.LossTerm):
  """``weight * H(LS_eps(y), z)``; see :func:`skd_jax.losses.label_smoothing_targets`."""

  weight: float = 1.0
  epsilon: float = terms.setting(0.1, low=0, high=1)
  variant: str = terms.setting('uniform', choices=('uniform', 'non_target'))
  name: str = 'label_smoothing'

  def __call__(self, inputs, rows=None, carry=None):
    return terms.TermOutput(
        losses.label_smoothing_cross_entropy(
            inputs.logits, inputs.one_hot, epsilon=self.epsilon, variant=self.variant
        )
    )
