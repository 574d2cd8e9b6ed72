"""Plain cross-entropy with the one-hot labels: the baseline term."""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class CrossEntropy(terms.LossTerm):
  """``weight * H(y, z)`` on the final head."""

  weight: float = 1.0
  name: str = 'cross_entropy'

  def __call__(self, inputs, rows=None, carry=None):
    return terms.TermOutput(losses.soft_target_cross_entropy(inputs.logits, inputs.one_hot))
