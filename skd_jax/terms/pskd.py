"""PS-KD: progressive self-knowledge distillation (Kim et al., ICCV 2021).

The history ``P`` (``[N, C]``, one row per training example) is this term's per-example state.
It starts as the one-hot labels, so epoch 0 trains on the labels exactly as the official code
(which writes ``P[idx] = y`` before use). Each step reads ``P[idx]`` for the targets and returns
``sg(softmax(z))`` of the same forward pass (pre-update parameters, T = 1) as the batch's new
rows; the trainer writes them after the update. A prediction therefore first serves as a target
one epoch later: targets lag one epoch, and a sample never teaches itself within a step.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class PSKD(terms.LossTerm):
  """``weight * H((1 - a_t) y + a_t P[idx], z)`` with ``a_t = alpha_T (t + 1) / E``."""

  num_classes: int
  num_epochs: int
  weight: float = 1.0
  alpha_T: float = 0.8
  name: str = 'pskd'

  def init_rows(self, labels):
    return jax.nn.one_hot(labels, self.num_classes, dtype=jnp.float32)

  def __call__(self, inputs, rows=None, carry=None):
    alpha = losses.pskd_alpha(inputs.epoch, alpha_T=self.alpha_T, num_epochs=self.num_epochs)
    loss = losses.pskd_cross_entropy(inputs.logits, inputs.one_hot, rows, alpha=alpha)
    new_rows = jax.lax.stop_gradient(jax.nn.softmax(inputs.logits.astype(jnp.float32)))
    return terms.TermOutput(loss, rows=new_rows, metrics={'pskd/alpha': alpha})


def make(settings, context):
  return PSKD(
      num_classes=context.num_classes,
      num_epochs=context.num_epochs,
      weight=float(settings.weight),
      alpha_T=terms.check_range(settings, 'alpha_T', 0, 1, 'pskd'),
  )
