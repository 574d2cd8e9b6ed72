"""Label smoothing (Szegedy et al., CVPR 2016) on the final head."""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class LabelSmoothing(terms.LossTerm):
  """``weight * H(LS_eps(y), z)``; see :func:`skd_jax.losses.label_smoothing_targets`."""

  weight: float = 1.0
  epsilon: float = 0.1
  variant: str = 'uniform'
  name: str = 'label_smoothing'

  def __call__(self, inputs, rows=None, carry=None):
    return terms.TermOutput(
        losses.label_smoothing_cross_entropy(
            inputs.logits, inputs.one_hot, epsilon=self.epsilon, variant=self.variant
        )
    )


def make(settings, context):
  del context
  variant = terms.check_choice(
      settings, 'variant', ('uniform', 'non_target'), 'label_smoothing', 'uniform'
  )
  return LabelSmoothing(
      weight=float(settings.weight),
      epsilon=terms.check_range(settings, 'epsilon', 0, 1, 'label_smoothing'),
      variant=variant,
  )
