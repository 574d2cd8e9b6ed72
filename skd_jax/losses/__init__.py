"""Pure, per-example loss functions for self-knowledge distillation.

Arrays in, one value per example out; hyperparameters are keyword-only. Nothing here imports
Flax modules, TFDS, TensorFlow or orbax, so the functions drop into any JAX code::

  from skd_jax import losses
  per_example = losses.pskd_cross_entropy(logits, one_hot, history_rows, alpha=0.4)
"""

from skd_jax.losses._soft_targets import label_smoothing_cross_entropy
from skd_jax.losses._soft_targets import label_smoothing_targets
from skd_jax.losses._soft_targets import pskd_alpha
from skd_jax.losses._soft_targets import pskd_cross_entropy
from skd_jax.losses._soft_targets import pskd_targets
from skd_jax.losses._soft_targets import soft_target_cross_entropy

__all__ = [
    'label_smoothing_cross_entropy',
    'label_smoothing_targets',
    'pskd_alpha',
    'pskd_cross_entropy',
    'pskd_targets',
    'soft_target_cross_entropy',
]
