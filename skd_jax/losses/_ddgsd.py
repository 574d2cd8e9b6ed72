"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019)."""

import jax
import jax.numpy as jnp

from skd_jax.losses._distillation import distillation_kl
from skd_jax.losses._soft_targets import _as_indices

MMD_KINDS = ('vector', 'scalar')


def _valid_mean(x: jax.Array, valid: jax.Array) -> jax.Array:
  """``[D]``: the mean of ``[B, D]`` rows over the valid ones."""
  count = jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)
  return jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0) / count


def ddgsd_loss(
    logits: jax.typing.ArrayLike,
    other_logits: jax.typing.ArrayLike,
    features: jax.typing.ArrayLike,
    other_features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: float = 3.0,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    mmd_weight: float = 0.005,
    mmd: str = 'vector',
    valid: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""DDGSD's loss over two distortions of every example (Ting-Bing Xu, Cheng-Lin Liu, AAAI 2019).

  "Data-Distortion Guided Self-Distillation for Deep Neural Networks". Each example :math:`i` is
  seen under two independent draws of the training augmentation, giving logits
  :math:`z^1_i, z^2_i` and pooled features :math:`f^1_i, f^2_i \in \mathbb{R}^d`; with
  :math:`q^v_i = \mathrm{softmax}(z^v_i / T)`:

  .. math::
    L_i &= \alpha\,[\mathrm{CE}(z^1_i, y_i) + \mathrm{CE}(z^2_i, y_i)]
      + \lambda T^2\,[\mathrm{KL}(\mathrm{sg}\,q^2_i \| q^1_i)
                    + \mathrm{KL}(\mathrm{sg}\,q^1_i \| q^2_i)] + \mu\, M \\
    M_{vector} &= \textstyle\sum_d (\bar f^1_d - \bar f^2_d)^2, \qquad
      \bar f^v = \mathrm{mean}_{j\ \mathrm{valid}}\, f^v_j \\
    M_{scalar} &= \big(\mathrm{mean}_{j, d}\, f^1_{jd} - \mathrm{mean}_{j, d}\, f^2_{jd}\big)^2

  :math:`M` is a linear-kernel MMD² between the two batches of features: a property of the
  batch, not of an example. It is split per example by giving every example the whole batch
  value: the mean of :math:`L_i` over the valid examples (what the trainer minimises) is then the
  batch loss exactly, and its gradient reaches every example's features through the batch means.
  A per-example MSE between :math:`f^1_i` and :math:`f^2_i` would be a different, stronger loss.
  Padding slots (``valid`` False) take no part in the means.

  Variants (METHODS.md §3.13): yechanp/self_kd's ``DDGSD`` (``models/methods.py`` L289-323) is
  the default, :math:`\alpha = 1, \lambda = 1, T = 3, \mu = 0.005`, ``mmd='vector'``;
  Self-KD-Lib's ``methods/ddsgd.py`` is :math:`\alpha = 1/4` (its cross-entropy is a mean over
  the :math:`2B` logits, halved), :math:`\lambda = 1, T = 4, \mu = 5\cdot10^{-4}`,
  ``mmd='scalar'``. The paper's own kernel and weights could not be checked.

  Two identical views: no KL and no MMD, twice the cross-entropy.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z, f, y = jnp.array([[0.0, 0.0]]), jnp.array([[1.0, 0.0]]), jnp.array([0])
  >>> losses.ddgsd_loss(z, z, f, f, y).round(4)  # 2 log 2
  Array([1.3863], dtype=float32)
  >>> losses.ddgsd_loss(z, z, f, 0 * f, y, ce_weight=0.0, mmd_weight=1.0).round(4)  # (1 - 0)^2
  Array([1.], dtype=float32)

  Args:
    logits: ``[B, C]`` logits of the first distortion (gradients flow).
    other_logits: ``[B, C]`` logits of the second distortion (gradients flow).
    features: ``[B, D]`` pooled features of the first distortion.
    other_features: ``[B, D]`` pooled features of the second distortion.
    labels: ``[B]`` integer labels.
    temperature: :math:`T` of the KL terms.
    ce_weight: :math:`\alpha`, the weight of each view's cross-entropy.
    kl_weight: :math:`\lambda`.
    mmd_weight: :math:`\mu`.
    mmd: ``'vector'`` (:math:`M_{vector}`, yechanp) or ``'scalar'`` (:math:`M_{scalar}`,
      Self-KD-Lib).
    valid: ``[B]`` bool, False on padding slots; default all True.

  Returns:
    ``[B]`` float32 per-example losses.
  """
  z1 = jnp.asarray(logits, jnp.float32)
  z2 = jnp.asarray(other_logits, jnp.float32)
  f1 = jnp.asarray(features, jnp.float32)
  f2 = jnp.asarray(other_features, jnp.float32)
  labels = _as_indices(labels, 'labels')
  if z1.ndim != 2 or z2.shape != z1.shape or labels.shape != z1.shape[:1]:
    raise ValueError(
        f'logits {z1.shape}, other_logits {z2.shape} and labels {labels.shape}: expected '
        '[B, C], [B, C] and [B]'
    )
  if f1.ndim != 2 or f2.shape != f1.shape or f1.shape[0] != z1.shape[0]:
    raise ValueError(f'features {f1.shape} and other_features {f2.shape}: expected [B, D] each')
  if mmd not in MMD_KINDS:
    raise ValueError(f'mmd: expected one of {MMD_KINDS}, got {mmd!r}')
  valid = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid, bool)
  one_hot = jax.nn.one_hot(labels, z1.shape[-1], dtype=jnp.float32)
  ce = lambda z: -jnp.sum(one_hot * jax.nn.log_softmax(z), axis=-1)
  kl = distillation_kl(z1, z2, temperature=temperature) + distillation_kl(
      z2, z1, temperature=temperature
  )
  mean1, mean2 = _valid_mean(f1, valid), _valid_mean(f2, valid)
  if mmd == 'vector':
    discrepancy = jnp.sum((mean1 - mean2) ** 2)
  else:
    discrepancy = (jnp.mean(mean1) - jnp.mean(mean2)) ** 2
  return ce_weight * (ce(z1) + ce(z2)) + kl_weight * kl + mmd_weight * discrepancy
