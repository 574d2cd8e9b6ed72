"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019; arXiv 1905.08094).

One auxiliary classifier after each shallow stage (``first_stage`` .. N-1 of an N-stage
backbone); the student's own final classifier (``inputs.logits``, ``outputs['features']``) is the
deepest one and teaches the others through a temperature-softened soft cross-entropy and an L2
"hint" between pooled features. The loss of the heads is :func:`skd_jax.losses.byot_loss`; the
final classifier's cross-entropy is the separate ``cross_entropy`` term (weight ``1 - alpha`` for
the paper's formula). Gradients of the heads flow into the backbone. Heads exist only in
training; evaluation and export use the backbone alone.

Heads: the ``'later_stages'`` kind (``ResNet.later_stages_head``): stages ``i+1 .. N`` are
re-instantiated with the backbone's block type, stage sizes and widths, then global average
pooling and a Dense layer with C outputs, so every head's pooled features have the final width
and the feature L2 is defined without adapters. The paper's heads are bottleneck convolutions to
the final width; Self-KD-Lib's (``models/resnet.py`` ``CIFAR_ResNet18_byot``) re-instantiate the
later stages with one block each (``branch_layers=[[1, 1], [1]]``) where ours use the backbone's
stage sizes (two blocks for ResNet-18), and its feature hint compares the unpooled last feature
maps where ours compares pooled features.

The settings' defaults (alpha 0.5, T 3 with T², no feature term) are no published setting:
``configs/byot.py`` sets Self-KD-Lib's; the paper's and the journal code's are in docs/methods.md.
"""

import dataclasses

import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms
from skd_jax.terms import _branches


@dataclasses.dataclass(frozen=True)
class BYOT(_branches.StageBranches, terms.LossTerm):
  """``weight * byot_loss(z, [z_1 .. z_K], y)`` with heads ``byot<i>`` on ``stage<i>``."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  alpha: float = terms.setting(0.5, low=0, high=1)
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  t2_scaling: bool = True
  feature_weight: float = terms.setting(0.0, low=0, high=1e3)
  feature_reduction: str = terms.setting('sum', choices=('sum', 'mean'))
  first_stage: int = terms.setting(1, low=1)  # and below the backbone's last stage (check)
  name: str = 'byot'

  def __call__(self, inputs, rows=None, carry=None):
    names = self.branch_names(inputs.outputs)
    head_logits = [inputs.outputs[k] for k in names]
    use_features = bool(self.feature_weight)
    loss = losses.byot_loss(
        inputs.logits,
        head_logits,
        inputs.one_hot,
        alpha=self.alpha,
        temperature=self.temperature,
        t2_scaling=self.t2_scaling,
        features=inputs.outputs['features'] if use_features else None,
        head_features=[inputs.outputs[f'{k}/features'] for k in names] if use_features else None,
        feature_weight=self.feature_weight,
        feature_reduction=self.feature_reduction,
    )
    metrics = {
        f'{k}/top1': 100.0 * (jnp.argmax(z, -1) == inputs.labels).astype(jnp.float32)
        for k, z in zip(names, head_logits)
    }
    return terms.TermOutput(loss, metrics=metrics)
