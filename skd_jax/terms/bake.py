"""BAKE: self-distillation with batch knowledge ensembling (Ge et al., 2021; arXiv 2104.13298).

One pass, no history, no extra network. The batch's own softened predictions are propagated
along the affinities of its L2-normalised pooled features (``outputs['features']``): every
example's soft target is ``(1 - omega) [(I - omega A)^{-1} softmax(Z / T)]_i``, without gradient
(:func:`skd_jax.losses.bake_targets`), and the student matches it with ``T^2 KL``. The
ensemble runs over the whole (global) batch, as the official ImageNet code with
``GLOBAL_KE: True`` (an all-gather over GPUs) and its single-GPU small-scale code; padding slots
take no part. The cross-entropy is a separate ``cross_entropy`` term; this term's weight is
lambda.

Batches: the official samplers draw each anchor with ``M`` other examples of its class (CIFAR-100
``M = 3``, ImageNet ``M = 1``), all of which get the loss. This term ensembles over the source's
ordinary batch (no class-balanced sampling); see docs/methods.md.

Official code: github.com/yxgeee/BAKE @ 07c4f66, ``small_scale/train.py`` L103-127 and L143-150,
``imagenet/pycls/core/trainer.py`` L84-122.
"""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class BAKE(terms.LossTerm):
  """``weight * T^2 KL(q || softmax(z / T))``, ``q`` the batch-ensembled targets; weight: lambda."""

  weight: float = 1.0
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  # omega = 1 makes I - omega A singular (A is row-stochastic).
  omega: float = terms.setting(0.5, low=0.0, high=0.99)
  name: str = 'bake'

  def __call__(self, inputs, rows=None, carry=None):
    loss = losses.bake_loss(
        inputs.logits,
        inputs.outputs['features'],
        temperature=self.temperature,
        omega=self.omega,
        valid=inputs.valid,
    )
    return terms.TermOutput(loss)
