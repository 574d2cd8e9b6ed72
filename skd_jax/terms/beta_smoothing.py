"""Beta smoothing: self-distillation as instance-specific label smoothing (Zhang & Sabuncu, 2020).

An EMA copy of the student (decay ``min(1 - 1/(t + 2), ema_max_decay)`` at update ``t = 0, 1, ...``,
kept by the trainer and evaluated beside the student) gives every example's true-class
confidence. The batch's draws from ``Beta(a, b)`` (the term's PRNG key of the step) are sorted
and handed out by confidence rank, most confident example first
(:func:`skd_jax.losses.beta_smoothing_targets`), and the student learns
``H(target, z)``. The EMA pass runs in evaluation mode (running BatchNorm statistics) without
gradient. With ``cross_entropy`` weight ``1 - alpha`` and this term's weight ``alpha`` the sum
is the paper's ``(1 - alpha) CE + alpha H(target, z)``.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class BetaSmoothing(terms.LossTerm):
  """``weight * H(target_b, z)``, ``b`` drawn from ``Beta(a, b)`` by EMA confidence rank."""

  weight: float = 0.6
  a: float = terms.setting(3.0, low=1e-3, high=1e3)
  b: float = terms.setting(1.0, low=1e-3, high=1e3)
  ema_max_decay: float = terms.setting(0.999, low=0, high=1)
  name: str = 'beta_smoothing'
  forwards = (terms.Forward('ema', network='ema'),)

  def __call__(self, inputs, rows=None, carry=None):
    ema = inputs.passes['ema']
    confidence = jnp.sum(jax.nn.softmax(ema.logits) * inputs.one_hot, axis=-1)
    draws = jax.random.beta(inputs.key, self.a, self.b, confidence.shape)
    targets = losses.beta_smoothing_targets(inputs.one_hot, confidence, draws, valid=inputs.valid)
    return terms.TermOutput(
        losses.soft_target_cross_entropy(inputs.logits, targets),
        metrics={'beta_smoothing/ema_confidence': confidence},
    )
