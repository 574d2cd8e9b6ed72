"""DLB: self-distillation from the last mini-batch (Shen et al., CVPR 2022).

Each step also sees the previous step's examples (the source's ``'previous'`` group) under a new
augmentation, in a forward pass with gradient, and distils toward the logits the model produced
for them one step earlier. Those logits are this term's carry, ``[B, C]`` sharded along ``data``
with the batch, so they never cross devices; the carry runs across epoch boundaries and is part of
every checkpoint. The previous examples' pass is a separate call, as in the reference code (its
own BatchNorm batch statistics).

The reference computes one cross-entropy over the concatenation of both batches (a mean over
``2 B``) plus the distillation; with a ``cross_entropy`` term of weight 0.5 and ``ce_weight=0.5``
here the sum is the same. At a run's first step there is no previous batch (the source marks the
whole ``'previous'`` group invalid) and the reference trains on the plain cross-entropy of the
current batch with weight 1. This term then gives ``ce_weight H(y, z)`` on the current batch: the
previous batch's half of the cross-entropy falls on the current one, so the step's loss is the
reference's with ``cross_entropy`` as the other half, and also with PS-KD's target as the other
half (``configs/pskd_dlb.py``: one-hot in epoch 0). The first step is read from the data, not
from a step count, so a resumed run (whose previous group is valid) needs nothing more.

Slot ``i`` of the previous group is weighted like the main example in slot ``i`` (the trainer
averages over the main examples' validity). This differs from the reference only at the steps
around an epoch's short last batch (``docs/methods.md``).
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class DLB(terms.LossTerm):
  """``weight * [ce_weight H(y', z') + alpha T^2 KL(softmax(sg(z_{t-1})/T) || softmax(z'/T))]``.

  ``z'`` is this step's prediction on the previous step's examples ``x'`` (labels ``y'``),
  ``z_{t-1}`` the prediction on them at the previous step. At a run's first step (no valid
  previous example) ``weight * ce_weight H(y, z)`` on the current batch.
  """

  num_classes: int
  batch_size: int
  weight: float = 1.0
  alpha: float = terms.setting(1.0, low=0, high=1e3)
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  ce_weight: float = terms.setting(0.5, low=0, high=1e3)
  name: str = 'dlb'
  forwards = (terms.Forward('previous', group='previous', network='student', grad=True),)
  carry_sharding = 'batch'

  def init_carry(self):
    return {'logits': jnp.zeros((self.batch_size, self.num_classes), jnp.float32)}

  def __call__(self, inputs, rows=None, carry=None):
    previous = inputs.passes['previous']
    one_hot = jax.nn.one_hot(previous.labels, self.num_classes, dtype=jnp.float32)
    ce = losses.soft_target_cross_entropy(previous.logits, one_hot)
    kd = losses.distillation_kl(previous.logits, carry['logits'], temperature=self.temperature)
    loss = jnp.where(previous.valid, self.ce_weight * ce + self.alpha * kd, 0.0)
    first_step = ~jnp.any(previous.valid)
    current = self.ce_weight * losses.soft_target_cross_entropy(inputs.logits, inputs.one_hot)
    loss = jnp.where(first_step, current, loss)
    return terms.TermOutput(loss, carry={'logits': jax.lax.stop_gradient(inputs.logits)})
