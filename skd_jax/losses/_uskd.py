"""USKD: normalized target / non-target losses with customised soft labels (Yang et al., 2023)."""

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_indices

# Added to the denominators of the ranking score, as the official code.
_RANK_EPSILON = 1e-6


def _group_mean(values: jax.Array, valid: jax.Array, group_size: int) -> jax.Array:
  """``[B]``: each example's mean of ``values`` over the valid examples of its group.

  Groups are consecutive runs of ``group_size`` examples (0: the whole batch is one group).
  """
  batch = values.shape[0]
  size = group_size or batch
  if batch % size:
    raise ValueError(f'group_size: {size} does not divide the batch of {batch}')
  grouped = jnp.where(valid, values, 0.0).reshape(-1, size)
  count = jnp.maximum(valid.reshape(-1, size).sum(-1, keepdims=True), 1)
  mean = grouped.sum(-1, keepdims=True) / count
  return jnp.broadcast_to(mean, grouped.shape).reshape(batch)


def uskd_loss(
    logits: jax.typing.ArrayLike,
    weak_logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    valid: jax.typing.ArrayLike | None = None,
    group_size: int = 0,
    rank_mix: str = 'official',
) -> jax.Array:
  r"""USKD's self-distillation loss (Yang, Zeng, Li, Zhang, Yuan, Li; ICCV 2023; arXiv 2303.13005).

  "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
  Loss and Customized Soft Labels". With :math:`\ell = \log\mathrm{softmax}(z)`,
  :math:`p = \mathrm{softmax}(z)`, :math:`y` the label and :math:`w` the logits of a weak linear
  classifier on an intermediate feature, per example :math:`i`:

  .. math::
    a_i &= p_{i,y}^2, \qquad
      \hat p_i = \mathrm{sg}\big(a_i + 1 - \mathrm{mean}_{j \in G(i)}\, a_j\big),
      \qquad L_t = -\hat p_i\, \ell_{i,y} \\
    u &= 0.9\, \mathrm{onehot}(y) + 0.1 / C, \qquad
      L_w = -\textstyle\sum_c u_c \log\mathrm{softmax}(w_i)_c \\
    s_c &= \frac{r_c}{1 - r_y + 10^{-6}} + \frac{\ell_{i,c}}{1 - \ell_{i,y} + 10^{-6}},
      \quad r = \mathrm{softmax}(w_i), \qquad
      n_c = \mathrm{sg}\Big(\frac{1/\mathrm{pos}_c}{\sum_{c' \ne y} 1/\mathrm{pos}_{c'}}\Big)
      \ (c \ne y) \\
    L_{non} &= -\textstyle\sum_{c \ne y} n_c \log\mathrm{softmax}(z_{i,\neg y})_c \\
    L &= \alpha L_t + \beta L_{non} + \mu L_w

  :math:`\mathrm{pos}_c` is class :math:`c`'s 1-based position when the scores :math:`s` are
  sorted in descending order (a Zipf distribution over the ranking; the target keeps its position,
  usually 1), and :math:`\mathrm{softmax}(z_{i,\neg y})` is the softmax over the :math:`C - 1`
  non-target logits. As in the official code (``rank_mix='official'``) the score mixes the weak
  head's probabilities with the final head's log-probabilities, which dominate it;
  ``rank_mix='probs'`` uses the final head's probabilities :math:`p` in the second term instead
  (what the paper's text describes). :math:`G(i)` is example :math:`i`'s group: the whole batch,
  or consecutive runs of ``group_size`` examples (the official mean is over each device's batch).
  The final head's own cross-entropy is not included: combine with a cross-entropy term. Only
  :math:`L_w` reaches the weak head (and, through its input, the backbone); the soft labels carry
  no gradient.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> z = jnp.array([[0.0, 0.0]])  # two classes: the non-target softmax is 1, so L_non = 0
  >>> y = jnp.array([0])
  >>> # one example: p_hat = 1, L_t = log 2; weak head uniform: L_w = log 2
  >>> losses.uskd_loss(z, z, y, alpha=1.0, beta=1.0, mu=0.0).round(4)
  Array([0.6931], dtype=float32)
  >>> losses.uskd_loss(z, z, y, alpha=0.0, beta=0.0, mu=1.0).round(4)
  Array([0.6931], dtype=float32)

  Args:
    logits: ``[B, C]`` final-head logits.
    weak_logits: ``[B, C]`` the weak classifier's logits (gradients flow).
    labels: ``[B]`` integer labels (hard labels; the official soft-label branch for mixup is not
      implemented).
    alpha: weight of the target term :math:`L_t` (official CIFAR 0.1, ImageNet 1).
    beta: weight of the non-target term :math:`L_{non}` (0.1).
    mu: weight of the weak head's smoothed cross-entropy :math:`L_w` (CIFAR 0.1, ImageNet 0.005).
    valid: ``[B]`` bool, False on padding slots, which are left out of the batch mean; default
      all True.
    group_size: examples per group of the mean of :math:`a`; 0 for the whole batch. Must divide B.
    rank_mix: ``'official'`` (log-probabilities of the final head in the score) or ``'probs'``.

  Returns:
    ``[B]`` float32 per-example losses.
  """
  logits = jnp.asarray(logits, jnp.float32)
  weak_logits = jnp.asarray(weak_logits, jnp.float32)
  labels = _as_indices(labels, 'labels')
  if logits.ndim != 2 or weak_logits.shape != logits.shape or labels.shape != logits.shape[:1]:
    raise ValueError(
        f'logits {logits.shape}, weak_logits {weak_logits.shape} and labels {labels.shape}: '
        'expected [B, C], [B, C] and [B]'
    )
  if rank_mix not in ('official', 'probs'):
    raise ValueError(f"rank_mix: expected 'official' or 'probs', got {rank_mix!r}")
  batch, num_classes = logits.shape
  valid = jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid, bool)
  target = jax.nn.one_hot(labels, num_classes, dtype=bool)
  pick = lambda x: jnp.sum(jnp.where(target, x, 0.0), axis=-1)

  log_p = jax.nn.log_softmax(logits)
  log_p_y = pick(log_p)
  # Target term: the squared target probability, shifted by its group mean to a mean of 1.
  a = jnp.exp(2.0 * log_p_y)
  p_hat = jax.lax.stop_gradient(a + 1.0 - _group_mean(a, valid, group_size))
  loss_target = -p_hat * log_p_y

  # Weak head: cross-entropy with label smoothing 0.1 (the uniform part includes the target).
  log_r = jax.nn.log_softmax(weak_logits)
  smooth = 0.9 * target + 0.1 / num_classes
  loss_weak = -jnp.sum(smooth * log_r, axis=-1)

  # Non-target soft labels: Zipf weights over the ranking of the mixed score.
  r = jnp.exp(log_r)
  score = r / (1.0 - pick(r)[:, None] + _RANK_EPSILON)
  final, final_y = log_p, log_p_y
  if rank_mix == 'probs':
    final, final_y = jnp.exp(log_p), jnp.exp(log_p_y)
  score = score + final / (1.0 - final_y[:, None] + _RANK_EPSILON)
  order = jnp.argsort(jax.lax.stop_gradient(score), axis=-1, descending=True, stable=True)
  position = jnp.argsort(order, axis=-1)  # 0-based position of each class in the ranking
  zipf = jnp.where(target, 0.0, 1.0 / (position + 1.0))
  soft = jax.lax.stop_gradient(zipf / jnp.sum(zipf, axis=-1, keepdims=True))
  # Log-softmax over the non-target logits only; the target's slot is excluded by where=.
  log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True, where=~target)
  loss_non = -jnp.sum(jnp.where(target, 0.0, soft * (logits - log_norm)), axis=-1)

  return alpha * loss_target + beta * loss_non + mu * loss_weak
