"""Zipf's label smoothing (Liang et al., ECCV 2022): one pass, no history, no extra network.

The student's own final Dense layer (``inputs.classify``) is applied at every location of the
map that the backbone pools into its features (``outputs['feature_map']``), optionally after a
bilinear x2 upsampling (the official CIFAR setting: a 4x4 map gives 64 votes). Each location
votes for its argmax class; the classes are ranked by votes, the label's rank included, and a
Zipf prior ``1 / rank ** power`` over the other ``C - 1`` classes is matched by the softmax of
the non-target logits (:func:`skd_jax.losses.zipf_ls_loss`). The votes carry no gradient. The
cross-entropy is a separate ``cross_entropy`` term; this term's weight is lambda.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms

UPSAMPLES = ('bilinear', 'none')


def dense_logits(features: jax.Array, classify, upsample: str) -> jax.Array:
  """``[B, P, C]`` logits of ``classify`` at the ``P`` locations of a ``[B, H, W, D]`` map.

  ``upsample='bilinear'`` first resizes the map to ``2H x 2W`` with half-pixel centres (PyTorch's
  ``F.upsample(scale_factor=2, mode='bilinear')``, ``align_corners=False``).
  """
  batch, height, width, depth = features.shape
  if upsample == 'bilinear':
    height, width = 2 * height, 2 * width
    features = jax.image.resize(features, (batch, height, width, depth), 'bilinear')
  logits = classify(features.reshape(batch * height * width, depth))
  return logits.reshape(batch, height * width, -1)


@dataclasses.dataclass(frozen=True)
class ZipfLS(terms.LossTerm):
  """``weight * KL(zipf(rank(votes)) || softmax(z without the label))``; weight is lambda."""

  weight: float = 0.1
  upsample: str = terms.setting('bilinear', choices=UPSAMPLES)
  power: float = terms.setting(1.0, low=0, high=10)
  name: str = 'zipf_ls'

  def __call__(self, inputs, rows=None, carry=None):
    feature_map = jax.lax.stop_gradient(inputs.outputs['feature_map'])
    dense = jax.lax.stop_gradient(dense_logits(feature_map, inputs.classify, self.upsample))
    votes = losses.dense_class_votes(dense)
    loss = losses.zipf_ls_loss(inputs.logits, inputs.one_hot, votes, power=self.power)
    # How often the label wins the vote: the non-target weights then start at 1/2.
    label_first = jnp.argmax(votes, axis=-1) == inputs.labels
    return terms.TermOutput(
        loss, metrics={'zipf_ls/label_votes_first': label_first.astype(jnp.float32)}
    )
