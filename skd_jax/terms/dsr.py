"""DSR: LightSKD's distillation with shape-wise regularization (Xu et al., arXiv 2305.09183).

The carry holds the previous step's ascending-sorted logits ``[B, C]`` (from its forward pass,
pre-update parameters) and whether there was a previous step. Row ``i`` of the current batch is
distilled toward row ``i`` of the previous batch: different examples, so only the *shape* of the
ranked output is shared. The carry runs across epoch boundaries (the official code instead skips
the first batch of every epoch); only the very first step of a run has no teacher and gives 0.
It is part of every checkpoint, so a resumed run continues exactly. Our batches always have the
configured size (the last batch of an epoch is padded), as the pairing requires.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class DSR(terms.LossTerm):
  """``weight * T^2 KL(softmax(sg(sort(z_{t-1}))/T) || softmax(sort(z_t)/T))``; weight is beta."""

  num_classes: int
  batch_size: int
  weight: float = 1.0
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  name: str = 'dsr'

  def init_carry(self):
    return {
        'sorted_logits': jnp.zeros((self.batch_size, self.num_classes), jnp.float32),
        'has_previous': jnp.zeros((), jnp.bool_),
    }

  def __call__(self, inputs, rows=None, carry=None):
    loss = losses.dsr_loss(inputs.logits, carry['sorted_logits'], temperature=self.temperature)
    loss = jnp.where(carry['has_previous'], loss, 0.0)
    sorted_logits = jax.lax.stop_gradient(jnp.sort(inputs.logits.astype(jnp.float32), axis=-1))
    return terms.TermOutput(
        loss, carry={'sorted_logits': sorted_logits, 'has_previous': jnp.ones((), jnp.bool_)}
    )
