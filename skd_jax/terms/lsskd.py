"""LSSKD: layered self-supervised self-distillation (Dahri et al., arXiv 2506.07055).

Every training example is expanded, on the device, into its four rotations (0, 90, 180, 270
degrees of the augmented image); the model sees all ``4 B`` images, so BatchNorm statistics cover
the whole expanded batch, while the final classifier's cross-entropy (a separate
``cross_entropy`` term) uses only the unrotated copies. One auxiliary head per backbone stage
(HSAKD's design: the later stages re-instantiated, the last stage's head one extra stride-1
stage, then ``4 C`` outputs) learns the joint label ``4 y + k``; deeper heads teach shallower
ones and the deepest head's aggregated class scores teach the final classifier. The loss, the
pairing (``'deepest'``, HSAKD's, or ``'adjacent'``), the weights and the optional feature
alignment are described in :func:`skd_jax.losses.lsskd_loss`. Gradients of the heads flow into the
backbone (self-distillation: the heads' task shapes the shared features). Heads exist only in
training.
"""

import dataclasses
import re

import jax.numpy as jnp

from skd_jax import errors
from skd_jax import losses
from skd_jax import terms

NUM_ROTATIONS = 4


@dataclasses.dataclass(frozen=True)
class LSSKD(terms.LossTerm):
  """``weight * lsskd_loss(z, [s_1 .. s_L], y)`` with heads ``lsskd1`` .. ``lsskdL``."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  pairing: str = terms.setting('deepest', choices=('deepest', 'adjacent'))
  head_ce_weight: float = terms.setting(1.0, low=0, high=1e3)
  head_kd_weight: float = terms.setting(1.0, low=0, high=1e3)
  main_kd_weight: float = terms.setting(1.0, low=0, high=1e3)
  aggregation: str = terms.setting('matched', choices=('matched', 'sum'))
  feature_weight: float = terms.setting(0.0, low=0, high=1e3)
  name: str = 'lsskd'
  num_views = NUM_ROTATIONS

  def heads(self):
    # One head per stage; skd_jax.networks checks the backbone has that many and can rebuild them.
    return tuple(
        terms.HeadRequest(f'{self.name}{l}', l, 'later_stages', NUM_ROTATIONS * self.num_classes)
        for l in range(1, self.num_stages + 1)
    )

  def check(self, context):
    if not context.num_stages:
      raise errors.ConfigError('loss.lsskd: the model has no numbered stages to attach heads to')
    shape = context.image_shape
    if shape is not None and shape[0] != shape[1]:
      raise errors.ConfigError(
          f'loss.lsskd: rotations need square images, got {shape[0]}x{shape[1]}'
      )

  def make_views(self, images, key=None):
    del key  # deterministic
    # Quarter turns in the image plane; images are square (checked in check()).
    return jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)], axis=1)

  def _head_names(self, views):
    pattern = re.compile(rf'{re.escape(self.name)}(\d+)')
    found = [(int(m.group(1)), k) for k in views if (m := pattern.fullmatch(k))]
    return [k for _, k in sorted(found)]

  def __call__(self, inputs, rows=None, carry=None):
    names = self._head_names(inputs.views)
    head_logits = [inputs.views[k] for k in names]
    features = [inputs.views[f'{k}/features'] for k in names] if self.feature_weight else None
    loss = losses.lsskd_loss(
        inputs.logits,
        head_logits,
        inputs.one_hot,
        temperature=self.temperature,
        pairing=self.pairing,
        head_ce_weight=self.head_ce_weight,
        head_kd_weight=self.head_kd_weight,
        main_kd_weight=self.main_kd_weight,
        aggregation=self.aggregation,
        head_features=features,
        feature_weight=self.feature_weight,
    )
    # Each head's training top-1 (%) from its aggregated class scores.
    metrics = {
        f'{k}/top1': 100.0
        * (jnp.argmax(losses.aggregate_joint_logits(s), -1) == inputs.labels).astype(jnp.float32)
        for k, s in zip(names, head_logits)
    }
    return terms.TermOutput(loss, metrics=metrics)
