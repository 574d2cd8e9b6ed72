"""SD-Dropout: self-knowledge distillation via dropout (Lee, Park, Seo, Kang; arXiv 2208.05642).

Two independent inverted-dropout masks on the pooled penultimate feature ``h`` (the backbone's
``'features'`` output) give two sub-models that share everything else; the student's own final
Dense layer (``inputs.classify``) maps each dropped copy to logits, and the two softened
posteriors distil into each other in both directions (:func:`skd_jax.losses.sd_dropout_loss`).
Gradients reach the classifier and, through ``h``, the backbone. The masks come from the term's
PRNG key of the step, so a resumed run draws the same masks; they are applied only here, never in
the model's forward pass or at evaluation. The cross-entropy on the undropped logits is a
separate ``cross_entropy`` term.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


def _drop(key, features, rate):
  keep = jax.random.bernoulli(key, 1.0 - rate, features.shape)
  return jnp.where(keep, features / (1.0 - rate), 0).astype(features.dtype)


@dataclasses.dataclass(frozen=True)
class SDDropout(terms.LossTerm):
  """``weight * T^2 [KL(q^v || q^u) + KL(q^u || q^v)]`` on two dropped copies; weight is lambda."""

  weight: float = 0.1
  rate: float = terms.setting(0.5, low=0, high=0.99)
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  stop_gradient: bool = False
  name: str = 'sd_dropout'

  def __call__(self, inputs, rows=None, carry=None):
    features = inputs.outputs['features']
    key_u, key_v = jax.random.split(inputs.key)
    logits_u = inputs.classify(_drop(key_u, features, self.rate))
    logits_v = inputs.classify(_drop(key_v, features, self.rate))
    return terms.TermOutput(
        losses.sd_dropout_loss(
            logits_u, logits_v, temperature=self.temperature, stop_gradient=self.stop_gradient
        )
    )
