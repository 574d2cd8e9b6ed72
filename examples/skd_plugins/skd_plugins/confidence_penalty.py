"""The confidence penalty (Pereyra et al., "Regularizing Neural Networks by Penalizing Confident
Output Distributions", ICLR 2017 workshop) as a loss term from outside skd_jax.

With ``config.loss.cross_entropy = dict(weight=1.0)`` beside it, the objective is the paper's

  L_i = CE(y_i, p_i) - beta * H(p_i),   H(p) = -sum_c p_c log p_c,   p = softmax(z),

where ``beta`` is this term's ``weight``: the term's own per-example loss is ``-H(p_i)``, in
``[-log C, 0]``. Optionally, only confident predictions are penalised: with ``threshold`` tau > 0
the loss is ``max(0, tau - H(p_i)) - tau`` (``-H`` below the threshold, ``-tau`` above, where its
gradient is zero).

  config.loss.confidence_penalty = dict(module='skd_plugins.confidence_penalty', weight=0.1)

The module defines one ``terms.LossTerm`` dataclass and no ``make``: skd_jax builds it from the
config's settings, checked against their declarations (``terms.setting``), and calls its
``check`` with the run's context.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from skd_jax import errors
from skd_jax import terms


def entropy(logits: jax.Array) -> jax.Array:
  """``[B]`` entropy (nats) of ``softmax(logits)`` for ``[B, C]`` logits, computed in float32."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


@dataclasses.dataclass(frozen=True)
class ConfidencePenalty(terms.LossTerm):
  """``weight * (-H(softmax(z)))`` per example, or its thresholded form (module docstring)."""

  weight: float = 0.1
  threshold: float = terms.setting(0.0, low=0)  # at most log C, the most entropy (check)
  name: str = 'confidence_penalty'

  def check(self, context):
    """What depends on the run: no distribution of C classes has more entropy than log C."""
    limit = math.log(context.num_classes)
    if self.threshold > limit:
      raise errors.ConfigError(
          f'loss.{self.name}.threshold: expected a number in [0, {limit}], got {self.threshold!r}'
      )

  def __call__(self, inputs, rows=None, carry=None):
    h = entropy(inputs.logits)
    loss = -h
    if self.threshold > 0:
      loss = jnp.maximum(0.0, self.threshold - h) - self.threshold
    return terms.TermOutput(loss, metrics={f'{self.name}/entropy': h})
