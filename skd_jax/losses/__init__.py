"""Pure, per-example loss functions for self-knowledge distillation.

Arrays in, one value per example out; hyperparameters are keyword-only. Nothing here imports
Flax modules, TFDS, TensorFlow or orbax, so the functions drop into any JAX code::

  from skd_jax import losses
  per_example = losses.pskd_cross_entropy(logits, one_hot, history_rows, alpha=0.4)
"""

from skd_jax.losses._adversarial import adversarial_loss
from skd_jax.losses._adversarial import discriminator_loss
from skd_jax.losses._bake import bake_loss
from skd_jax.losses._bake import bake_targets
from skd_jax.losses._byot import byot_loss
from skd_jax.losses._compact import compress_top_k
from skd_jax.losses._compact import expand_top_k
from skd_jax.losses._compact import index_dtype
from skd_jax.losses._ddgsd import ddgsd_loss
from skd_jax.losses._distillation import aggregate_joint_logits
from skd_jax.losses._distillation import distillation_kl
from skd_jax.losses._distillation import drg_loss
from skd_jax.losses._distillation import dsr_loss
from skd_jax.losses._distillation import lsskd_loss
from skd_jax.losses._distillation import rotation_joint_labels
from skd_jax.losses._dks import dks_loss
from skd_jax.losses._frskd import frskd_attention_map
from skd_jax.losses._frskd import frskd_loss
from skd_jax.losses._mixskd import mixskd_loss
from skd_jax.losses._mixskd import mixskd_mix
from skd_jax.losses._peers import beta_smoothing_targets
from skd_jax.losses._peers import sd_dropout_loss
from skd_jax.losses._soft_targets import label_smoothing_cross_entropy
from skd_jax.losses._soft_targets import label_smoothing_targets
from skd_jax.losses._soft_targets import pskd_alpha
from skd_jax.losses._soft_targets import pskd_cross_entropy
from skd_jax.losses._soft_targets import pskd_targets
from skd_jax.losses._soft_targets import soft_target_cross_entropy
from skd_jax.losses._teacher_free import tfkd_reg_loss
from skd_jax.losses._teacher_free import tfkd_reg_targets
from skd_jax.losses._uskd import uskd_loss
from skd_jax.losses._zipf import dense_class_votes
from skd_jax.losses._zipf import zipf_ls_loss
from skd_jax.losses._zipf import zipf_targets

__all__ = [
    'adversarial_loss',
    'aggregate_joint_logits',
    'bake_loss',
    'bake_targets',
    'beta_smoothing_targets',
    'byot_loss',
    'compress_top_k',
    'ddgsd_loss',
    'dense_class_votes',
    'discriminator_loss',
    'distillation_kl',
    'dks_loss',
    'drg_loss',
    'dsr_loss',
    'expand_top_k',
    'frskd_attention_map',
    'frskd_loss',
    'index_dtype',
    'label_smoothing_cross_entropy',
    'label_smoothing_targets',
    'lsskd_loss',
    'mixskd_loss',
    'mixskd_mix',
    'pskd_alpha',
    'pskd_cross_entropy',
    'pskd_targets',
    'rotation_joint_labels',
    'sd_dropout_loss',
    'soft_target_cross_entropy',
    'tfkd_reg_loss',
    'tfkd_reg_targets',
    'uskd_loss',
    'zipf_ls_loss',
    'zipf_targets',
]
