"""Losses of the peer methods that need more than a KL to a teacher: SD-Dropout, Beta smoothing."""

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature


def sd_dropout_loss(
    logits_u: jax.typing.ArrayLike,
    logits_v: jax.typing.ArrayLike,
    *,
    temperature: float = 3.0,
    stop_gradient: bool = False,
) -> jax.Array:
  r"""SD-Dropout's symmetric distillation between two dropout sub-models (Lee et al., 2022).

  ``logits_u`` and ``logits_v`` come from the same classifier applied to two independently
  dropped copies of the pooled feature. With :math:`q^u = \mathrm{softmax}(z^u/T)` and
  :math:`q^v = \mathrm{softmax}(z^v/T)`:

  .. math::
    L = T^2 \big[\mathrm{KL}(q^v \| q^u) + \mathrm{KL}(q^u \| q^v)\big]
      = T^2 \sum_c (q^v_c - q^u_c)(\log q^v_c - \log q^u_c)

  per example. With ``stop_gradient=False`` (the official default) gradients flow through both
  arguments of both KLs; with ``True`` the first argument of each KL is a stop-gradient teacher
  (the official ``--detach``). The value is the same either way.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[1.0, 0.0]])
  >>> losses.sd_dropout_loss(z, z)  # identical sub-models agree
  Array([0.], dtype=float32)
  >>> losses.sd_dropout_loss(z, -z, temperature=1.0).round(4)  # 2 (2 sigmoid(1) - 1) * 1
  Array([0.9242], dtype=float32)

  Args:
    logits_u: ``[B, C]`` logits of the first dropped copy.
    logits_v: ``[B, C]`` logits of the second.
    temperature: softening temperature ``T`` (3 in the paper's code).
    stop_gradient: detach the teacher side of each KL.

  Returns:
    ``[B]`` float32 per-example losses.
  """
  _check_temperature(temperature)
  logits_u, logits_v = _as_float32(logits_u, 'logits_u'), _as_float32(logits_v, 'logits_v')
  _check_shapes(logits_u=logits_u, logits_v=logits_v)
  log_u = jax.nn.log_softmax(logits_u / temperature, axis=-1)
  log_v = jax.nn.log_softmax(logits_v / temperature, axis=-1)
  teacher_u, teacher_v = log_u, log_v
  if stop_gradient:
    teacher_u, teacher_v = jax.lax.stop_gradient(log_u), jax.lax.stop_gradient(log_v)
  kl_vu = jnp.sum(jnp.exp(teacher_v) * (teacher_v - log_u), axis=-1)
  kl_uv = jnp.sum(jnp.exp(teacher_u) * (teacher_u - log_v), axis=-1)
  return temperature**2 * (kl_vu + kl_uv)


def beta_smoothing_targets(
    labels: jax.typing.ArrayLike,
    confidence: jax.typing.ArrayLike,
    draws: jax.typing.ArrayLike,
    *,
    valid: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""Beta smoothing's instance-specific targets (Zhang & Sabuncu, NeurIPS 2020).

  The batch's draws :math:`b \sim \mathrm{Beta}(a, b)` are sorted and handed out by the rank of
  each example's true-class confidence (of an EMA copy of the model): the most confident example
  gets the largest draw. Example :math:`i`'s target puts :math:`b_i` on its class and
  :math:`(1 - b_i)/(C - 1)` on every other class. Only valid examples take part in the ranking,
  and only their draws are used; invalid examples get the one-hot label.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> y = jnp.eye(3)[jnp.array([0, 1])]
  >>> losses.beta_smoothing_targets(y, jnp.array([0.9, 0.2]), jnp.array([0.7, 0.4]))
  Array([[0.7 , 0.15, 0.15],
         [0.3 , 0.4 , 0.3 ]], dtype=float32)

  Args:
    labels: ``[B, C]`` one-hot labels.
    confidence: ``[B]`` each example's true-class probability under the teacher (EMA) model.
    draws: ``[B]`` draws of the target confidences (e.g. ``jax.random.beta(key, 3, 1, (B,))``).
    valid: ``[B]`` bool, False on padding slots; default all True.

  Returns:
    ``[B, C]`` float32 target distributions.
  """
  labels = _as_float32(labels, 'labels')
  if labels.ndim != 2:
    raise ValueError(f'labels: expected one-hot rows [B, C], got shape {labels.shape}')
  batch, num_classes = labels.shape
  valid = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid, bool)
  for name, x in (('confidence', confidence), ('draws', draws), ('valid', valid)):
    if jnp.shape(x) != (batch,):
      raise ValueError(f'{name}: expected shape [B] = ({batch},), got {jnp.shape(x)}')
  # Invalid slots sort last on both sides, so valid example of rank r gets the r-th smallest of
  # the valid draws.
  order = jnp.argsort(jnp.where(valid, jnp.asarray(confidence, jnp.float32), jnp.inf), stable=True)
  rank = jnp.zeros((batch,), jnp.int32).at[order].set(jnp.arange(batch, dtype=jnp.int32))
  assigned = jnp.sort(jnp.where(valid, jnp.asarray(draws, jnp.float32), jnp.inf))[rank]
  b = jnp.where(valid, assigned, 1.0)[:, None]
  return labels * b + (1.0 - labels) * (1.0 - b) / (num_classes - 1)
