"""MixSKD: self-knowledge distillation from mixup (Yang et al., ECCV 2022)."""

from typing import Sequence

import jax
import jax.numpy as jnp

from skd_jax.losses._distillation import distillation_kl
from skd_jax.losses._soft_targets import _as_indices


def mixskd_mix(x: jax.typing.ArrayLike, lam, perm: jax.typing.ArrayLike) -> jax.Array:
  """``lam x + (1 - lam) x[perm]`` along the leading (example) axis: MixSKD's mixture of inputs,
  and of outputs (logits, feature maps) when applied to the originals' outputs.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.mixskd_mix(jnp.array([0.0, 4.0]), 0.25, jnp.array([1, 0]))
  Array([3., 1.], dtype=float32)
  """
  x = jnp.asarray(x)
  return lam * x + (1.0 - lam) * x[jnp.asarray(perm)]


def _ce(logits, labels):
  log_p = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def _bce_with_logits(logits, target):
  return jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def _discriminate(params, maps):
  """A MixSKD discriminator ``Linear -> ReLU -> Linear`` on globally pooled ``[B, ..., D]``."""
  w1, b1, w2, b2 = params
  pooled = maps.reshape(maps.shape[0], -1, maps.shape[-1]).mean(axis=1)
  return jax.nn.relu(pooled @ w1 + b1) @ w2 + b2


def mixskd_loss(
    logits: Sequence[jax.typing.ArrayLike],
    mixed_logits: Sequence[jax.typing.ArrayLike],
    maps: Sequence[jax.typing.ArrayLike],
    mixed_maps: Sequence[jax.typing.ArrayLike],
    teacher_of_mixture: jax.typing.ArrayLike,
    teacher_of_mixed: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    lam,
    perm: jax.typing.ArrayLike,
    temperature: float = 3.0,
    mix_ce: bool = True,
    discriminators: Sequence[tuple[jax.Array, ...]] | None = None,
) -> jax.Array:
  r"""MixSKD's loss (Yang, An, Zhou, Cai, Zhi, Wu, Xu, Zhang; ECCV 2022; arXiv 2208.05768).

  "MixSKD: Self-Knowledge Distillation from Mixup for Image Recognition". A batch ``x`` and its
  mixup :math:`\tilde x = \lambda x + (1 - \lambda) x_\pi` go through the network together; at
  :math:`K` exits (auxiliary branches :math:`k < K`, the backbone :math:`k = K`) the
  originals give logits :math:`z_k` and final feature maps :math:`F_k`, the mixed images
  :math:`\tilde z_k, \tilde F_k`. The mixture of outputs is :math:`\hat z_k = \lambda z_k +
  (1 - \lambda) z_{k,\pi}` (and :math:`\hat F_k`, :func:`mixskd_mix`); a self-teacher :math:`h`
  over the :math:`K` maps gives :math:`\hat t = h(\hat F)` and :math:`\tilde t = h(\tilde F)`
  (computed by the caller). With :math:`\mathrm{KD}(s \leftarrow t) = T^2\,\mathrm{KL}(
  \mathrm{softmax}(\mathrm{sg}\,t / T) \| \mathrm{softmax}(s / T))` and
  :math:`\mathrm{MixCE}(s) = \lambda\,\mathrm{CE}(s, y) + (1 - \lambda)\,\mathrm{CE}(s, y_\pi)`,
  per (original and mixed) example :math:`i`:

  .. math::
    L_{cls} &= \textstyle\sum_k \mathrm{CE}(z_k, y)
      + [\textstyle\sum_k \mathrm{MixCE}(\tilde z_k) + \mathrm{MixCE}(\hat t)
      + \mathrm{MixCE}(\tilde t)]_{\text{mix\_ce}} \\
    L_{logit} &= \mathrm{KD}(\hat z_K \leftarrow \tilde t) + \mathrm{KD}(\tilde z_K \leftarrow
      \hat t) + \textstyle\sum_{k<K} [\mathrm{KD}(\hat z_k \leftarrow \tilde z_k)
      + \mathrm{KD}(\tilde z_k \leftarrow \hat z_k)] \\
    L_{fea} &= \textstyle\sum_k \mathrm{mean}_{h,w,c} (\hat F_k - \tilde F_k)^2 \\
    L_{adv} &= \tfrac14 \textstyle\sum_k \sum_{c=1,2} [\mathrm{BCE}(D_k(\bar{\hat F}_k)_c,
      (1, 0)_c) + \mathrm{BCE}(D_k(\bar{\tilde F}_k)_c, (0, 1)_c)]

  and :math:`L = L_{cls} + L_{logit} + L_{fea} + L_{adv}`, all weights 1. The mean over the
  batch is the official training loss (``main_mixskd_cifar.py`` L164-201, whose batch means
  divide each term by :math:`B`, the adversarial BCE by :math:`4B`: split here as a quarter of
  each example's four entries). ``mix_ce`` False is the official CIFAR script, which logs the
  MixCE terms but leaves them out of the loss; True is its ImageNet script. :math:`D_k` is
  ``Linear(d, 128) -> ReLU -> Linear(128, 2)`` on the pooled map, ``discriminators`` its
  ``(w1, b1, w2, b2)`` per exit (None: no :math:`L_{adv}`); in the official code they are never
  trained (held in a plain list, so not registered): fixed random weights, through which the
  gradient reaches the features. Gradients flow into both mixed sources of :math:`\hat z_k,
  \hat F_k`; teachers are stop-gradient. Terms that pair example :math:`i` with :math:`\pi(i)`
  are charged to :math:`i`.

  One exit, identical originals and :math:`\lambda = 1`: only the cross-entropies remain.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z, f, y = jnp.zeros((1, 2)), jnp.zeros((1, 1, 1, 3)), jnp.array([0])
  >>> losses.mixskd_loss([z], [z], [f], [f], z, z, y, lam=1.0, perm=jnp.array([0])).round(4)
  Array([2.7726], dtype=float32)

  Args:
    logits: ``K`` arrays ``[B, C]``, the originals' logits at each exit, the backbone's last.
    mixed_logits: ``K`` arrays ``[B, C]``, the mixed images' logits.
    maps: ``K`` arrays ``[B, H, W, D]`` (or ``[B, D]``), the originals' final feature maps.
    mixed_maps: ``K`` arrays like ``maps``, the mixed images'.
    teacher_of_mixture: ``[B, C]`` :math:`\hat t = h(\hat F)`.
    teacher_of_mixed: ``[B, C]`` :math:`\tilde t = h(\tilde F)`.
    labels: ``[B]`` integer labels of the originals.
    lam: the mixing coefficient :math:`\lambda` (a scalar, one per batch).
    perm: ``[B]`` the pairing :math:`\pi`.
    temperature: :math:`T` (official 3).
    mix_ce: include the MixCE terms.
    discriminators: per exit ``(w1 [D, 128], b1 [128], w2 [128, 2], b2 [2])``, or None.

  Returns:
    ``[B]`` float32 per-example losses.
  """
  f32 = lambda xs: [jnp.asarray(x, jnp.float32) for x in xs]
  logits, mixed_logits = f32(logits), f32(mixed_logits)
  maps, mixed_maps = f32(maps), f32(mixed_maps)
  t_hat, t_tilde = f32((teacher_of_mixture, teacher_of_mixed))
  labels, perm = _as_indices(labels, 'labels'), _as_indices(perm, 'perm')
  if not len(logits) == len(mixed_logits) == len(maps) == len(mixed_maps) >= 1:
    raise ValueError('logits, mixed_logits, maps and mixed_maps: expected K >= 1 exits each')
  kd = lambda student, teacher: distillation_kl(student, teacher, temperature=temperature)
  mix_ce_of = lambda s: lam * _ce(s, labels) + (1.0 - lam) * _ce(s, labels[perm])
  mixture = [mixskd_mix(z, lam, perm) for z in logits]
  loss = sum(_ce(z, labels) for z in logits)
  if mix_ce:
    loss = loss + sum(mix_ce_of(z) for z in mixed_logits) + mix_ce_of(t_hat) + mix_ce_of(t_tilde)
  loss = loss + kd(mixture[-1], t_tilde) + kd(mixed_logits[-1], t_hat)
  for z_hat, z_tilde in zip(mixture[:-1], mixed_logits[:-1]):
    loss = loss + kd(z_hat, z_tilde) + kd(z_tilde, z_hat)
  batch = labels.shape[0]
  for f, f_tilde in zip(maps, mixed_maps):
    f_hat = mixskd_mix(f, lam, perm)
    loss = loss + jnp.mean(((f_hat - f_tilde) ** 2).reshape(batch, -1), axis=-1)
  if discriminators is not None:
    if len(discriminators) != len(maps):
      raise ValueError(
          f'discriminators: expected one per exit ({len(maps)}), got {len(discriminators)}'
      )
    for params, f, f_tilde in zip(discriminators, maps, mixed_maps):
      real = _discriminate(params, mixskd_mix(f, lam, perm))
      fake = _discriminate(params, f_tilde)
      one, zero = jnp.ones_like(real[:, :1]), jnp.zeros_like(real[:, :1])
      bce = _bce_with_logits(real, jnp.concatenate([one, zero], -1)).sum(-1)
      bce = bce + _bce_with_logits(fake, jnp.concatenate([zero, one], -1)).sum(-1)
      loss = loss + bce / 4.0
  return loss
