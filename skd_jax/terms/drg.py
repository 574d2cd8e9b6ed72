"""DRG: LightSKD's distillation with reverse guidance (Xu et al., arXiv 2305.09183).

A light auxiliary head (attention + separable convolutions, ``skd_jax.models.DRGHead``, built by
``skd_jax.networks``) on an
intermediate stage is trained with cross-entropy, and its detached softened prediction teaches
the final head: the shallow branch guides the deep one. The head's input width follows the
backbone's stage (the official code hard-codes 512 channels, which breaks on ResNet-18's stage 2).
The head exists only in training; evaluation and export use the backbone alone.
"""

import dataclasses

import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class DRG(terms.LossTerm):
  """``weight * [H(y, z^a) + alpha T^2 KL(softmax(sg(z^a)/T) || softmax(z/T))]``.

  ``z^a`` is ``inputs.outputs['drg']``, the head on ``stage<stage>``.
  """

  num_classes: int
  weight: float = 1.0
  alpha: float = terms.setting(0.2, low=0, high=1e3)
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  stage: int = terms.setting(2, low=1)  # skd_jax.networks checks it against the backbone
  name: str = 'drg'

  def heads(self):
    return (terms.HeadRequest(self.name, self.stage, 'drg', self.num_classes),)

  def __call__(self, inputs, rows=None, carry=None):
    aux = inputs.outputs[self.name]
    loss = losses.drg_loss(
        inputs.logits, aux, inputs.one_hot, alpha=self.alpha, temperature=self.temperature
    )
    top1 = 100.0 * (jnp.argmax(aux, -1) == inputs.labels).astype(jnp.float32)
    return terms.TermOutput(loss, metrics={'drg/top1': top1})
