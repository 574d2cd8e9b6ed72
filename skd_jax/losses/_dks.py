"""DKS: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019), the loss of all classifiers."""

from typing import Sequence

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes
from skd_jax.losses._soft_targets import _check_temperature


def dks_loss(
    logits: jax.typing.ArrayLike,
    head_logits: Sequence[jax.typing.ArrayLike],
    one_hot: jax.typing.ArrayLike,
    *,
    temperature: float = 4.0,
    t2_scaling: bool = True,
    synergy_weight: float = 1.0,
    epsilon: float = 0.0,
) -> jax.Array:
  r"""DKS's loss: the branches' cross-entropies and pairwise matching of every classifier.

  With the final classifier's logits :math:`z_0` and the auxiliary branches' :math:`z_1 .. z_K`,

  .. math::
    L = \sum_{a=1}^{K} H(y, z_a)
      + \lambda\, s \sum_{a=0}^{K} \sum_{b \ne a}
        \mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_b)/T)\ \|\ \mathrm{softmax}(z_a/T)\big)

  with :math:`s = T^2` (``t2_scaling``) or 1: every ordered pair once, the student :math:`a`
  receiving the gradient and the teacher :math:`b` stopped, so each pair is matched in both
  directions and the final classifier learns from the branches as they learn from it (Sun, Yao,
  Zhou, Zhao, "Deeply-supervised Knowledge Synergy", CVPR 2019, arXiv 1906.00675). With
  ``epsilon`` > 0 both distributions of every KL are smoothed as
  :math:`(p + \epsilon) / (1 + C \epsilon)` first, as the authors' code does. The final
  classifier's own cross-entropy :math:`H(y, z_0)` is not included: it is the ``cross_entropy``
  term. Self-KD-Lib's ``DKS`` is :math:`T = 4`, :math:`s = T^2`, :math:`\lambda = 1`,
  :math:`\epsilon = 0`; the authors' code is :math:`T = 1`, :math:`\lambda = 1`,
  :math:`\epsilon = 10^{-8}`, whose smoothing bounds :math:`\log q` below by about
  :math:`\log \epsilon`, which matters when a student is confidently wrong. Both sides use
  ``log_softmax`` (and ``logaddexp`` for the smoothing), so logits of magnitude 50 stay finite.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[0., 0.]])  # the final classifier and one branch agree: no KL
  >>> loss = losses.dks_loss(z, [z], jnp.array([[1., 0.]]), temperature=2.0)
  >>> round(float(loss[0]), 6)  # the branch's cross-entropy, log 2
  0.693147

  Args:
    logits: ``[B, C]`` logits of the final classifier.
    head_logits: ``K >= 1`` arrays ``[B, C]``, the auxiliary branches' logits.
    one_hot: ``[B, C]`` labels (one-hot or any target distribution).
    temperature: softening temperature :math:`T > 0`.
    t2_scaling: multiply the matching by :math:`T^2`.
    synergy_weight: :math:`\lambda \ge 0`, the weight of the matching against the
      cross-entropies.
    epsilon: :math:`\epsilon \ge 0`; 0 (no smoothing, Self-KD-Lib's) or the authors' 1e-8.

  Returns:
    ``[B]`` float32 per-example loss.

  Raises:
    ValueError: on shape mismatches or no branches.
  """
  if not head_logits:
    raise ValueError('head_logits: expected at least one auxiliary branch')
  _check_temperature(temperature)
  final = _as_float32(logits, 'logits')
  targets = _as_float32(one_hot, 'one_hot')
  _check_shapes(one_hot=targets, logits=final)
  branches = [final]
  for z in head_logits:
    z = _as_float32(z, 'head_logits')
    _check_shapes(head_logits=z, logits=final)
    branches.append(z)
  ce = sum(-jnp.sum(targets * jax.nn.log_softmax(z, axis=-1), axis=-1) for z in branches[1:])
  students = [jax.nn.log_softmax(z / temperature, axis=-1) for z in branches]
  if epsilon:
    # log((p + eps) / (1 + C eps)), from log p without leaving log space.
    shift = jnp.log1p(final.shape[-1] * epsilon)
    students = [jnp.logaddexp(s, jnp.log(epsilon)) - shift for s in students]
  teachers = [jax.lax.stop_gradient(s) for s in students]
  kl = 0.0
  for a, student in enumerate(students):
    for b, teacher in enumerate(teachers):
      if a != b:
        kl = kl + jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  scale = temperature**2 if t2_scaling else 1.0
  return ce + synergy_weight * scale * kl
