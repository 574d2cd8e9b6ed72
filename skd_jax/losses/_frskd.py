"""FRSKD: feature refinement via self-knowledge distillation (Ji et al., CVPR 2021)."""

from typing import Sequence

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature


def frskd_attention_map(features: jax.typing.ArrayLike) -> jax.Array:
  r"""FRSKD's (and Zagoruyko & Komodakis') spatial attention map of ``[B, H, W, C]`` features.

  .. math::
    A(f)_p = \frac{a_p}{\max(\|a\|_2, 10^{-12})},\qquad a_p = \frac1C \sum_c f_{p,c}^2

  over the ``H W`` positions ``p`` (the official ``F.normalize(f.pow(2).mean(1).view(B, -1))``).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> f = jnp.zeros((1, 1, 2, 3)).at[0, 0, 0].set(2.0)  # all energy at the first position
  >>> losses.frskd_attention_map(f).tolist()
  [[1.0, 0.0]]

  Args:
    features: ``[B, H, W, C]`` feature maps.

  Returns:
    ``[B, H * W]`` float32 maps of unit L2 norm (zero for an all-zero map).
  """
  f = _as_float32(features, 'features')
  if f.ndim != 4:
    raise ValueError(f'features: expected [B, H, W, C], got shape {f.shape}')
  a = jnp.mean(jnp.square(f), axis=-1).reshape(f.shape[0], -1)
  # max(||a||, 1e-12) as the square root of max(||a||^2, 1e-24): the same value, and a finite
  # gradient at a = 0 where the norm's would be NaN.
  norm = jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(a), axis=-1, keepdims=True), 1e-24))
  return a / norm


def frskd_loss(
    logits: jax.typing.ArrayLike,
    teacher_logits: jax.typing.ArrayLike,
    one_hot: jax.typing.ArrayLike,
    features: Sequence[jax.typing.ArrayLike],
    teacher_features: Sequence[jax.typing.ArrayLike],
    *,
    alpha: float = 2.0,
    beta: float = 100.0,
    temperature: float = 4.0,
    teacher_weight: float = 1.0,
) -> jax.Array:
  r"""FRSKD's loss beside the classifier's cross-entropy (Ji et al., CVPR 2021; arXiv 2103.08273).

  A self-teacher network refines the classifier's stage features :math:`f^l` into :math:`t^l`
  and classifies them, :math:`z_t`. With the classifier's logits :math:`z`,

  .. math::
    L = w\, H(y, z_t)
      + \alpha T^2\, \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_t)/T)\ \|\
        \mathrm{softmax}(z/T)\big)
      + \beta \sum_l \frac{1}{H_l W_l} \sum_p \big(A(f^l)_p - A(\mathrm{sg}(t^l))_p\big)^2

  with :math:`A` :func:`frskd_attention_map` (channel counts may differ between :math:`f^l` and
  :math:`t^l`; the maps' spatial sizes must agree). The self-teacher learns only from its own
  cross-entropy (weight :math:`w`, ``teacher_weight``; 1 in the official code); the classifier's
  cross-entropy :math:`H(y, z)` is the separate ``cross_entropy`` term. This is the official
  ``CrossEntropyLoss(bi_outputs)`` + ``Attention`` criterion (``distill_loss/AT.py``: ``alpha *
  DistillKL`` with a batchmean KL times :math:`T^2`, plus ``beta`` times the attention
  ``.mean()``, summed over levels) of MingiJi/FRSKD @ 98b87e5, per example: its batch mean is
  the official value. Both sides use ``log_softmax``.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[0., 0.]])  # teacher and classifier agree: only the teacher's CE is left
  >>> f = [jnp.ones((1, 2, 2, 3))]
  >>> loss = losses.frskd_loss(z, z, jnp.array([[1., 0.]]), f, [2 * f[0][..., :1]])
  >>> round(float(loss[0]), 6)  # log 2
  0.693147

  Args:
    logits: ``[B, C]`` the classifier's logits (the student).
    teacher_logits: ``[B, C]`` the self-teacher's logits: gradients from its cross-entropy only.
    one_hot: ``[B, C]`` labels (one-hot or any target distribution).
    features: ``L >= 1`` arrays ``[B, H_l, W_l, C_l]``, the classifier's feature maps.
    teacher_features: ``L`` arrays ``[B, H_l, W_l, C'_l]``, the refined maps (stop-gradient).
    alpha: weight :math:`\alpha \ge 0` of the logit distillation.
    beta: weight :math:`\beta \ge 0` of the attention distillation.
    temperature: softening temperature :math:`T > 0`.
    teacher_weight: weight :math:`w \ge 0` of the self-teacher's cross-entropy.

  Returns:
    ``[B]`` float32 per-example loss.

  Raises:
    ValueError: on shape mismatches or an empty or unequal number of feature maps.
  """
  _check_temperature(temperature)
  z, z_t = _as_float32(logits, 'logits'), _as_float32(teacher_logits, 'teacher_logits')
  targets = _as_float32(one_hot, 'one_hot')
  _check_shapes(logits=z, teacher_logits=z_t, one_hot=targets)
  if not features or len(features) != len(teacher_features):
    raise ValueError('features and teacher_features: expected as many maps (at least one)')
  ce = -jnp.sum(targets * jax.nn.log_softmax(z_t, axis=-1), axis=-1)
  log_teacher = jax.nn.log_softmax(jax.lax.stop_gradient(z_t) / temperature, axis=-1)
  kl = jnp.sum(
      jnp.exp(log_teacher) * (log_teacher - jax.nn.log_softmax(z / temperature, axis=-1)), axis=-1
  )
  attention = 0.0
  for f, t in zip(features, teacher_features):
    if not f.shape[:3] == t.shape[:3] == (z.shape[0], *f.shape[1:3]):
      raise ValueError(
          f'features {f.shape} and teacher_features {t.shape}: expected [B, H, W] equal, with '
          f'the B = {z.shape[0]} of logits'
      )
    a_f = frskd_attention_map(f)
    a_t = frskd_attention_map(jax.lax.stop_gradient(t))
    attention = attention + jnp.mean(jnp.square(a_f - a_t), axis=-1)
  return teacher_weight * ce + alpha * temperature**2 * kl + beta * attention
