"""Distillation losses: one output of the network teaches another, softened by a temperature.

Teachers are always stop-gradient. Every function upcasts to float32, takes keyword-only
hyperparameters and returns one value per example.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature
from skd_jax.losses._soft_targets import soft_target_cross_entropy


def distillation_kl(
    logits: jax.typing.ArrayLike, teacher_logits: jax.typing.ArrayLike, *, temperature: float = 1.0
) -> jax.Array:
  r"""Temperature-scaled KL divergence from a stop-gradient teacher to the student (Hinton, 2015).

  .. math::
    L = T^2 \cdot \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(t)/T)\ \|\ \mathrm{softmax}(z/T)\big)
      = T^2 \sum_c p^t_c (\log p^t_c - \log p^z_c)

  summed over classes ("batchmean" once the caller averages over examples). The :math:`T^2` factor
  keeps gradient magnitudes independent of :math:`T`. Both sides use ``log_softmax``, so logits of
  magnitude 50 stay finite in float32 and bfloat16.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> float(losses.distillation_kl(jnp.array([[1., 2.]]), jnp.array([[1., 2.]]), temperature=4.)[0])
  0.0

  Args:
    logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (gradients are stopped).
    temperature: softening temperature :math:`T > 0`.

  Returns:
    ``[...]`` float32 per-example loss.
  """
  _check_temperature(temperature)
  logits = _as_float32(logits, 'logits')
  teacher = jax.lax.stop_gradient(_as_float32(teacher_logits, 'teacher_logits'))
  _check_shapes(logits=logits, teacher_logits=teacher)
  kl = optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(logits / temperature), jax.nn.log_softmax(teacher / temperature)
  )
  return temperature**2 * kl


def drg_loss(
    logits: jax.typing.ArrayLike,
    aux_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 0.2,
    temperature: float = 4.0,
) -> jax.Array:
  r"""LightSKD's Distillation with Reverse Guidance (DRG; Xu et al., arXiv 2305.09183).

  A shallow auxiliary head learns the labels and its softened prediction teaches the final head:

  .. math::
    L = H(y, z^a) + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z^a)/T)\ \|\
        \mathrm{softmax}(z/T)\big)

  The final head's own :math:`H(y, z)` is not included: combine with a cross-entropy term.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[3., 0.]])  # final head and auxiliary head agree: only the head's CE remains
  >>> round(float(losses.drg_loss(z, z, jnp.array([[1., 0.]]))[0]), 4)  # log(1 + e^-3)
  0.0486

  Args:
    logits: ``[B, C]`` final-head logits.
    aux_logits: ``[B, C]`` shallow head's logits (the teacher of the KL, the student of the CE).
    labels: ``[B, C]`` one-hot labels.
    alpha: weight of the distillation (0.2 in the paper).
    temperature: :math:`T` (4 in the paper).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  labels = _as_float32(labels, 'labels')
  return soft_target_cross_entropy(aux_logits, labels) + alpha * distillation_kl(
      logits, aux_logits, temperature=temperature
  )


def dsr_loss(
    logits: jax.typing.ArrayLike,
    previous_sorted_logits: jax.typing.ArrayLike,
    *,
    temperature: float = 4.0,
) -> jax.Array:
  r"""LightSKD's Distillation with Shape-wise Regularization (DSR; Xu et al., arXiv 2305.09183).

  Each example's logits are sorted ascending and distilled toward the sorted logits the model
  produced for *another* example (row ``i`` of the previous step's batch), so the shape of the
  ranked output becomes consistent across data:

  .. math::
    L_i = T^2\, \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(s^{t-1}_i)/T)\ \|\
          \mathrm{softmax}(\mathrm{sort}(z_i)/T)\big)

  Gradients flow through the sort. The loss is invariant to permuting the classes of either
  argument.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> # Sorted, [0, 2, 1] is [0, 1, 2]: the same shape as [5, 6, 7] up to a shift, so no loss.
  >>> float(losses.dsr_loss(jnp.array([[0., 2., 1.]]), jnp.array([[5., 6., 7.]]))[0])
  0.0

  Args:
    logits: ``[B, C]`` logits of the current step.
    previous_sorted_logits: ``[B, C]`` ascending-sorted logits of the previous step
      (``jnp.sort(z_prev, axis=-1)``; sorted again here, so rows in any order give the same
      loss; gradients are stopped).
    temperature: :math:`T` (4 in the paper).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logits = _as_float32(logits, 'logits')
  previous = _as_float32(previous_sorted_logits, 'previous_sorted_logits')
  _check_shapes(logits=logits, previous_sorted_logits=previous)
  # Sorting sorted rows changes nothing; unsorted ones (a caller's slip) still give the loss.
  return distillation_kl(
      jnp.sort(logits, axis=-1), jnp.sort(previous, axis=-1), temperature=temperature
  )


def rotation_joint_labels(labels: jax.typing.ArrayLike, num_rotations: int = 4) -> jax.Array:
  r"""One-hot joint labels of self-supervised label augmentation (Lee et al., ICML 2020).

  Example ``i`` rotated by ``k`` quarter turns has joint class :math:`R\,y_i + k` among
  :math:`R\,C` (class-major: index ``R*c + k``).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.rotation_joint_labels(jnp.array([[0., 1.]]), num_rotations=2)  # class 1: 2 + k
  Array([[[0., 0., 1., 0.],
          [0., 0., 0., 1.]]], dtype=float32)

  Args:
    labels: ``[B, C]`` one-hot (or soft) labels.
    num_rotations: :math:`R`.

  Returns:
    ``[B, R, R*C]`` float32 joint labels, ``[:, k]`` for the copy rotated ``k`` times.
  """
  labels = _as_float32(labels, 'labels')
  joint = jnp.einsum('bc,kj->bkcj', labels, jnp.eye(num_rotations, dtype=jnp.float32))
  return joint.reshape(labels.shape[0], num_rotations, -1)


def aggregate_joint_logits(
    joint_logits: jax.typing.ArrayLike, *, mode: str = 'matched'
) -> jax.Array:
  r"""Class scores from joint (class x rotation) logits of all rotated copies of an example.

  ``joint_logits[:, v, R*c + k]`` is the score of (class c, rotation k) for the copy rotated ``v``
  times.

  * ``'matched'`` (SLA's aggregated inference): :math:`a_c = \frac1R \sum_k s^{(k)}_{Rc+k}`, the
    mean over copies of the score of the rotation that copy really has.
  * ``'sum'``: :math:`a_c = \sum_k s^{(0)}_{Rc+k}`, the unrotated copy's scores summed over
    rotations (the HSAKD monitoring score).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> s = jnp.arange(8.).reshape(1, 2, 4)  # 2 classes x 2 rotations, copies 0 and 1
  >>> losses.aggregate_joint_logits(s), losses.aggregate_joint_logits(s, mode='sum')
  (Array([[2.5, 4.5]], dtype=float32), Array([[1., 5.]], dtype=float32))

  Args:
    joint_logits: ``[B, R, R*C]``.
    mode: ``'matched'`` or ``'sum'``.

  Returns:
    ``[B, C]`` float32 class scores.
  """
  s = _as_float32(joint_logits, 'joint_logits')
  batch, rotations, joint = s.shape
  s = s.reshape(batch, rotations, joint // rotations, rotations)
  if mode == 'matched':
    return jnp.mean(jnp.diagonal(s, axis1=1, axis2=3), axis=-1)
  if mode == 'sum':
    return jnp.sum(s[:, 0], axis=-1)
  raise ValueError(f"mode: expected 'matched' or 'sum', got {mode!r}")


def lsskd_loss(
    logits: jax.typing.ArrayLike,
    head_logits: Sequence[jax.typing.ArrayLike],
    labels: jax.typing.ArrayLike,
    *,
    temperature: float = 3.0,
    pairing: str = 'deepest',
    head_ce_weight: float = 1.0,
    head_kd_weight: float = 1.0,
    main_kd_weight: float = 1.0,
    aggregation: str = 'matched',
    head_features: Sequence[jax.typing.ArrayLike] | None = None,
    feature_weight: float = 0.0,
) -> jax.Array:
  r"""Layered self-supervised self-distillation (LSSKD; Dahri et al., arXiv 2506.07055).

  Built on HSAKD (Yang et al., IJCAI 2021): every example comes as its ``R`` rotations, auxiliary
  heads :math:`l = 1..L` (shallow to deep) predict the joint label :math:`Ry + k`, and knowledge
  flows from deeper heads to shallower ones and from the deepest head to the final classifier.
  The paper's code is not public; this is our documented reading (docs/methods.md, "LSSKD"):

  .. math::
    L_i = w_{ce} \sum_l \frac1R \sum_k H(\tilde y_{ik}, s_{l,ik})
        + w_{kd} \sum_{l<L} \frac1R \sum_k T^2\,\mathrm{KL}(\mathrm{sg}(s_{\pi(l),ik}) \|
          s_{l,ik})
        + w_{main}\, T^2\,\mathrm{KL}(\mathrm{sg}(\mathrm{agg}(s_{L,i})) \| z_i)
        + \mu \sum_{l<L} \frac1R \sum_k \| f_{l,ik} - \mathrm{sg}(f_{\pi(l),ik}) \|^2

  with softmax over :math:`s/T` and :math:`z/T` inside the KLs, teacher :math:`\pi(l) = L`
  (``pairing='deepest'``, HSAKD's choice) or :math:`\pi(l) = l + 1` (``'adjacent'``: one-to-one
  transfer between neighbouring stages), and ``agg`` from :func:`aggregate_joint_logits`. The
  final head's own cross-entropy on the unrotated copy is not included: combine with a
  cross-entropy term.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> heads = [jnp.zeros((2, 4, 12))] * 2  # two heads, 4 rotations, 4 x 3 joint classes
  >>> loss = losses.lsskd_loss(jnp.zeros((2, 3)), heads, jnp.eye(3)[:2])
  >>> loss.shape, round(float(loss[0]), 4)  # uniform heads: 2 x log(12) of joint CE, no KL
  ((2,), 4.9698)

  Args:
    logits: ``[B, C]`` final-head logits of the unrotated copies.
    head_logits: ``L`` arrays ``[B, R, R*C]``, shallow to deep, copy ``k`` rotated ``k`` times.
    labels: ``[B, C]`` one-hot labels.
    temperature: :math:`T` (3 in HSAKD).
    pairing: ``'deepest'`` or ``'adjacent'``.
    head_ce_weight, head_kd_weight, main_kd_weight: :math:`w_{ce}, w_{kd}, w_{main}`.
    aggregation: ``'matched'`` or ``'sum'`` (see :func:`aggregate_joint_logits`).
    head_features: ``L`` arrays ``[B, R, D]`` of the heads' pooled features; needed only when
      ``feature_weight > 0``.
    feature_weight: :math:`\mu` of the optional feature alignment (0: off).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  if pairing not in ('deepest', 'adjacent'):
    raise ValueError(f"pairing: expected 'deepest' or 'adjacent', got {pairing!r}")
  if not head_logits:
    raise ValueError('head_logits: expected at least one head')
  heads = [_as_float32(s, 'head_logits') for s in head_logits]
  depth = len(heads)
  teacher = (lambda l: depth - 1) if pairing == 'deepest' else (lambda l: l + 1)
  joint = rotation_joint_labels(labels, heads[0].shape[1])
  loss = head_ce_weight * sum(jnp.mean(soft_target_cross_entropy(s, joint), -1) for s in heads)
  loss += head_kd_weight * sum(
      jnp.mean(distillation_kl(heads[l], heads[teacher(l)], temperature=temperature), -1)
      for l in range(depth - 1)
  )
  agg = aggregate_joint_logits(heads[-1], mode=aggregation)
  loss += main_kd_weight * distillation_kl(logits, agg, temperature=temperature)
  if feature_weight:
    if head_features is None:
      raise ValueError('head_features: needed when feature_weight > 0')
    features = [_as_float32(f, 'head_features') for f in head_features]
    loss += feature_weight * sum(
        jnp.mean(jnp.sum((features[l] - jax.lax.stop_gradient(features[teacher(l)])) ** 2, -1), -1)
        for l in range(depth - 1)
    )
  return loss
