"""BAKE: self-distillation with batch knowledge ensembling (Ge et al., 2021)."""

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _check_number
from skd_jax.losses._soft_targets import _check_temperature


def bake_targets(
    logits: jax.typing.ArrayLike,
    features: jax.typing.ArrayLike,
    *,
    temperature: float = 4.0,
    omega: float = 0.5,
    valid: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""``[B, C]`` BAKE's batch-ensembled soft targets, without gradient.

  With :math:`f_i` the L2-normalised features, :math:`p_i = \mathrm{softmax}(z_i / T)` and
  :math:`A_{ij} = \exp(f_i^\top f_j) / \sum_{k \ne i} \exp(f_i^\top f_k)` for :math:`j \ne i`
  (:math:`A_{ii} = 0`; no temperature on the affinity, as the official code), the propagated
  targets are the fixed point of :math:`Q = \omega A Q + (1 - \omega) P`:

  .. math:: Q = (1 - \omega)\,(I - \omega A)^{-1} P.

  Padding slots (``valid`` False) take no part in any other example's ensemble; an example with
  no other valid example in its batch keeps :math:`q_i = p_i` (the official softmax then puts
  all of row :math:`i`'s weight on :math:`A_{ii}`), so a batch of one has no loss. Computed in
  float32 (float64 under x64) whatever the dtype of the inputs, through a linear solve instead of
  the official explicit inverse. Rows of ``Q`` sum to 1.

  Two examples are each other's only neighbour: ``q_1 = (p_1 + omega p_2) / (1 + omega)``.

  >>> import jax.numpy as jnp
  >>> z = jnp.log(jnp.array([[0.8, 0.2], [0.2, 0.8]]))
  >>> q = bake_targets(z, jnp.eye(2), temperature=1.0, omega=0.5)
  >>> [round(float(v), 4) for v in q[0]]  # (0.8 + 0.1, 0.2 + 0.4) / 1.5
  [0.6, 0.4]
  """
  _check_temperature(temperature)
  _check_number(omega, 'omega', low=0, high=1, open_high=True)
  logits = jax.lax.stop_gradient(jnp.asarray(logits))
  features = jax.lax.stop_gradient(jnp.asarray(features))
  dtype = jnp.promote_types(jnp.result_type(logits, features), jnp.float32)
  logits, features = logits.astype(dtype), features.astype(dtype)
  batch = logits.shape[0]
  valid = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid, bool)
  norm = jnp.linalg.norm(features, axis=-1, keepdims=True)
  unit = features / jnp.maximum(norm, 1e-12)  # F.normalize's epsilon
  eye = jnp.eye(batch, dtype=bool)
  # Cosine similarities lie in [-1, 1]: exp needs no max subtraction.
  weights = jnp.where(valid[None, :] & ~eye, jnp.exp(unit @ unit.T), 0.0)
  total = weights.sum(-1, keepdims=True)
  # An example with no neighbour (a batch of one valid example) keeps its own prediction, as the
  # official softmax over a row that is all -1e9 but the diagonal: A_ii = 1, so q_i = p_i.
  affinity = jnp.where(total > 0, weights / jnp.where(total > 0, total, 1.0), eye)
  probs = jax.nn.softmax(logits / temperature, axis=-1)
  system = jnp.eye(batch, dtype=dtype) - omega * affinity
  return jax.lax.stop_gradient((1.0 - omega) * jnp.linalg.solve(system, probs))


def bake_loss(
    logits: jax.typing.ArrayLike,
    features: jax.typing.ArrayLike,
    *,
    temperature: float = 4.0,
    omega: float = 0.5,
    valid: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  r"""``[B]`` BAKE's distillation loss (Ge, Choi, Zhang, Zhao, Zhu, Zhao, Li; arXiv 2104.13298).

  "Self-distillation with Batch Knowledge Ensembling Improves ImageNet Classification". Each
  example's soft target :math:`q_i` is the ensemble of the batch's own softened predictions,
  propagated along feature affinities (:func:`bake_targets`, no gradient); per example

  .. math:: L_i = T^2\, \mathrm{KL}\big(q_i \,\|\, \mathrm{softmax}(z_i / T)\big).

  The batch mean of ``L`` is the official ``KDLoss`` (``KLDivLoss(reduction='sum') * T^2 / B``);
  the training loss is ``CE + lambda * mean(L)``. The gradient flows through the logits of the
  student only.

  >>> import jax.numpy as jnp
  >>> z = jnp.array([[2.0, 0.0], [0.0, 2.0]])
  >>> loss = bake_loss(z, jnp.eye(2), temperature=1.0, omega=0.0)  # q = softmax(z): no loss
  >>> [abs(round(float(v), 6)) for v in loss]
  [0.0, 0.0]
  """
  logits = jnp.asarray(logits)
  targets = bake_targets(logits, features, temperature=temperature, omega=omega, valid=valid)
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  log_q = jax.nn.log_softmax(logits.astype(dtype) / temperature, axis=-1)
  targets = targets.astype(log_q.dtype)
  kl = jnp.sum(jax.scipy.special.xlogy(targets, targets) - targets * log_q, axis=-1)
  return temperature**2 * kl
