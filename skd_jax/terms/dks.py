"""DKS: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019; arXiv 1906.00675).

Auxiliary classifier branches on the shallow stages (``first_stage`` .. N-1 of an N-stage
backbone) learn from the labels, and every classifier, the student's own final one
(``inputs.logits``) included, is matched to every other one by a temperature-softened KL with the
other side stopped: :func:`skd_jax.losses.dks_loss`. The final classifier's cross-entropy is the
separate ``cross_entropy`` term. Gradients of the branches flow into the backbone. Branches exist
only in training; evaluation and export use the backbone alone.

Branches: the ``'later_stages'`` kind (``ResNet.later_stages_head``): stages ``i+1 .. N``
re-instantiated with the backbone's block type, stage sizes and widths, then global average
pooling and a Dense layer with C outputs. Where the reference codes differ (docs/methods.md, DKS):
winycg/Self-KD-Lib @ ede3062 (``CIFAR_ResNet18_dks``, ``branch_layers=[[1, 2], [2]]``) gives the
branch on stage 2 a stage-3 copy of one block where ours has the backbone's two, and builds every
stage of pre-activation blocks without a final BN + ReLU; the authors' WRN (sundw2014/DKS @
2853541) gives the branch on stage 1 a last stage of half the blocks and the branch on stage 2 a
last stage of twice the width. The authors' KL smooths both distributions by 1e-8 (``epsilon``;
0, Self-KD-Lib's, by default).
"""

import dataclasses

import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms
from skd_jax.terms import _branches


@dataclasses.dataclass(frozen=True)
class DKS(_branches.StageBranches, terms.LossTerm):
  """``weight * dks_loss(z, [z_1 .. z_K], y)`` with branches ``dks<i>`` on ``stage<i>``."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  t2_scaling: bool = True
  synergy_weight: float = terms.setting(1.0, low=0, high=1e3)
  epsilon: float = terms.setting(0.0, low=0, high=1e-2)
  first_stage: int = terms.setting(1, low=1)  # and below the backbone's last stage (check)
  name: str = 'dks'

  def __call__(self, inputs, rows=None, carry=None):
    names = self.branch_names(inputs.outputs)
    head_logits = [inputs.outputs[k] for k in names]
    loss = losses.dks_loss(
        inputs.logits,
        head_logits,
        inputs.one_hot,
        temperature=self.temperature,
        t2_scaling=self.t2_scaling,
        synergy_weight=self.synergy_weight,
        epsilon=self.epsilon,
    )
    metrics = {
        f'{k}/top1': 100.0 * (jnp.argmax(z, -1) == inputs.labels).astype(jnp.float32)
        for k, z in zip(names, head_logits)
    }
    return terms.TermOutput(loss, metrics=metrics)
