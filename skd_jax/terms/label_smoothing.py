"""Label smoothing (Szegedy et al., CVPR 2016) on the final head."""

import dataclasses

from skd_jax import errors
from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class LabelSmoothing(terms.LossTerm):
  """``weight * H(LS_eps(y), z)``; see :func:`skd_jax.losses.label_smoothing_targets`."""
  weight: float = 1.0
  epsilon: float = 0.1
  variant: str = 'uniform'
  name: str = 'label_smoothing'

  def __call__(self, inputs, rows, carry):
    return terms.TermOutput(losses.label_smoothing_cross_entropy(
        inputs.logits, inputs.one_hot, epsilon=self.epsilon, variant=self.variant))


def make(settings, context):
  del context
  variant = settings.get('variant', 'uniform')
  if variant not in ('uniform', 'non_target'):
    raise errors.ConfigError(
        f"loss.label_smoothing.variant: expected 'uniform' or 'non_target', got {variant!r}")
  return LabelSmoothing(weight=float(settings.weight),
                        epsilon=terms.check_range(settings, 'epsilon', 0, 1, 'label_smoothing'),
                        variant=variant)
