"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019), the loss of the shallow heads."""

from typing import Sequence

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature

FEATURE_REDUCTIONS = ('sum', 'mean')


def byot_loss(
    logits: jax.typing.ArrayLike,
    head_logits: Sequence[jax.typing.ArrayLike],
    one_hot: jax.typing.ArrayLike,
    *,
    alpha: float = 0.5,
    temperature: float = 3.0,
    t2_scaling: bool = True,
    features: jax.typing.ArrayLike | None = None,
    head_features: Sequence[jax.typing.ArrayLike] | None = None,
    feature_weight: float = 0.0,
    feature_reduction: str = 'sum',
) -> jax.Array:
  r"""BYOT's loss of the shallow classifiers, taught by the deepest one (Zhang et al., ICCV 2019).

  With the deepest classifier's logits :math:`z` and pooled features :math:`f` (both
  stop-gradient: the teacher) and shallow heads :math:`i = 1 .. K` with logits :math:`z_i` and
  features :math:`f_i`,

  .. math::
    L = (1-\alpha) \sum_i H(y, z_i)
      + \alpha\, s \sum_i \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z)/T)\ \|\
        \mathrm{softmax}(z_i/T)\big)
      + \lambda \sum_i r\big(f_i - \mathrm{sg}(f)\big)^2

  with :math:`s = T^2` (``t2_scaling``) or 1, and :math:`r(d)^2 = \sum_d d^2` (``'sum'``, the
  paper's squared L2) or :math:`\frac1D \sum_d d^2` (``'mean'``, Self-KD-Lib's ``.mean()``).
  The deepest classifier's own cross-entropy :math:`(1-\alpha) H(y, z)` is not included: it is
  the ``cross_entropy`` term (weight :math:`1-\alpha`). The paper writes the soft cross-entropy
  :math:`H(\cdot, z_i/T)`; the KL divergence used here (as Self-KD-Lib's ``DistillKL``) differs
  from it only by the teacher's entropy, a constant: the gradients are the same and the loss
  values match Self-KD-Lib's. Both sides use ``log_softmax``, so logits of magnitude 50 stay
  finite.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[0., 0.]])  # deepest head; the shallow head agrees with it
  >>> loss = losses.byot_loss(z, [z], jnp.array([[1., 0.]]), alpha=0.0, temperature=2.0)
  >>> round(float(loss[0]), 6)  # (1 - 0) * log 2
  0.693147

  Args:
    logits: ``[B, C]`` logits of the deepest (final) classifier, the teacher; gradients stopped.
    head_logits: ``K >= 1`` arrays ``[B, C]``, the shallow heads' logits.
    one_hot: ``[B, C]`` labels (one-hot or any target distribution).
    alpha: weight :math:`\alpha \in [0, 1]` of the distillation against the cross-entropy.
    temperature: softening temperature :math:`T > 0`.
    t2_scaling: multiply the distillation by :math:`T^2`.
    features: ``[B, D]`` pooled features of the deepest classifier (gradients stopped); needed
      when ``feature_weight > 0``.
    head_features: ``K`` arrays ``[B, D]``, the heads' pooled features, in ``head_logits``'
      order; needed when ``feature_weight > 0``.
    feature_weight: :math:`\lambda \ge 0`.
    feature_reduction: ``'sum'`` or ``'mean'`` over the feature dimension.

  Returns:
    ``[B]`` float32 per-example loss.

  Raises:
    ValueError: on shape mismatches, no heads, a missing feature input or an unknown reduction.
  """
  if not head_logits:
    raise ValueError('head_logits: expected at least one shallow head')
  if feature_reduction not in FEATURE_REDUCTIONS:
    raise ValueError(
        f'feature_reduction: expected one of {FEATURE_REDUCTIONS}, got ' f'{feature_reduction!r}'
    )
  _check_temperature(temperature)
  teacher = jax.lax.stop_gradient(_as_float32(logits, 'logits'))
  targets = _as_float32(one_hot, 'one_hot')
  _check_shapes(one_hot=targets, logits=teacher)
  log_soft = jax.nn.log_softmax(teacher / temperature, axis=-1)
  soft = jnp.exp(log_soft)
  scale = temperature**2 if t2_scaling else 1.0
  ce = kd = 0.0
  for z in head_logits:
    z = _as_float32(z, 'head_logits')
    _check_shapes(head_logits=z, logits=teacher)
    ce = ce - jnp.sum(targets * jax.nn.log_softmax(z, axis=-1), axis=-1)
    kd = kd + jnp.sum(soft * (log_soft - jax.nn.log_softmax(z / temperature, axis=-1)), axis=-1)
  loss = (1.0 - alpha) * ce + alpha * scale * kd
  if feature_weight:
    if features is None or head_features is None or len(head_features) != len(head_logits):
      raise ValueError('feature_weight > 0 needs features and one head_features per head')
    deep = jax.lax.stop_gradient(_as_float32(features, 'features'))
    reduce = jnp.sum if feature_reduction == 'sum' else jnp.mean
    for f in head_features:
      f = _as_float32(f, 'head_features')
      _check_shapes(head_features=f, features=deep)
      loss = loss + feature_weight * reduce(jnp.square(f - deep), axis=-1)
  return loss
