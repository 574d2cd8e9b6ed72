"""Zipf's label smoothing (Liang et al., ECCV 2022): a Zipf prior over the non-target classes,
ranked by the network's own dense predictions on the current input."""

import jax
import jax.numpy as jnp

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes


def dense_class_votes(dense_logits: jax.typing.ArrayLike) -> jax.Array:
  r"""Per-class vote counts of the per-location predictions of a feature map.

  ``dense_logits[b, p]`` are the classifier's logits at location ``p`` of example ``b``'s last
  feature map; every location votes for its argmax class (the first one on ties).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> dense = jnp.array([[[0., 2., 1.], [3., 0., 0.], [0., 5., 0.]]])  # 3 locations, 3 classes
  >>> losses.dense_class_votes(dense)
  Array([[1., 2., 0.]], dtype=float32)

  Args:
    dense_logits: ``[B, P, C]`` logits at ``P`` locations.

  Returns:
    ``[B, C]`` float32 counts (summing to ``P``), with no gradient.
  """
  dense_logits = jax.lax.stop_gradient(_as_float32(dense_logits, 'dense_logits'))
  num_classes = dense_logits.shape[-1]
  votes = jax.nn.one_hot(jnp.argmax(dense_logits, axis=-1), num_classes, dtype=jnp.float32)
  return jnp.sum(votes, axis=-2)


def zipf_targets(
    scores: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *, power: float = 1.0
) -> jax.Array:
  r"""Zipf's LS target over the non-target classes from per-class scores (e.g. vote counts).

  .. math::
    r_c = 1 + \#\{c' : s_{c'} > s_c\}, \qquad
    q_c = \frac{r_c^{-k}}{\sum_{c' \ne y} r_{c'}^{-k}} \ (c \ne y), \qquad q_y = 0

  Ranks are taken over all :math:`C` classes, the label included (ties share the smallest rank,
  SciPy's ``rankdata(method='min')``), then the label is removed and the rest renormalised: when
  the label has the most votes, the best other class gets :math:`2^{-k}` before normalisation.
  :math:`k` is ``power`` (1: Zipf's law).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> votes = jnp.array([[5., 3., 0., 0.]])  # ranks 1, 2, 3, 3; label 0 is removed
  >>> q = losses.zipf_targets(votes, jnp.array([[1., 0., 0., 0.]]))
  >>> (q * 7 / 6).round(4)  # (0, 1/2, 1/3, 1/3) / (7/6)
  Array([[0.    , 0.5   , 0.3333, 0.3333]], dtype=float32)

  Args:
    scores: ``[B, C]`` per-class scores; higher ranks first. Gradients are stopped.
    labels: ``[B, C]`` one-hot labels.
    power: exponent :math:`k` of the rank.

  Returns:
    ``[B, C]`` float32 distributions, zero on the label.
  """
  scores = jax.lax.stop_gradient(_as_float32(scores, 'scores'))
  labels = _as_float32(labels, 'labels')
  _check_shapes(scores=scores, labels=labels)
  # 1 + the number of strictly larger scores, from a sort: O(C log C) per example.
  ascending = jnp.sort(scores, axis=-1)
  larger = scores.shape[-1] - jax.vmap(jnp.searchsorted, in_axes=(0, 0, None))(
      ascending.reshape(-1, scores.shape[-1]), scores.reshape(-1, scores.shape[-1]), 'right'
  ).reshape(scores.shape)
  weights = (1.0 + larger.astype(jnp.float32)) ** -power * (1.0 - labels)
  return weights / jnp.sum(weights, axis=-1, keepdims=True)


def zipf_ls_loss(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    scores: jax.typing.ArrayLike,
    *,
    power: float = 1.0,
) -> jax.Array:
  r"""Zipf's label smoothing: KL from the Zipf prior to the non-target part of the softmax.

  .. math::
    L = \mathrm{KL}\big(q \,\|\, \mathrm{softmax}(z_{\lnot y})\big)
      = \sum_{c \ne y} q_c \big(\log q_c - \log \mathrm{softmax}(z_{\lnot y})_c\big)

  with :math:`q` from :func:`zipf_targets` and the softmax over the :math:`C - 1` non-target
  logits only, so the loss shapes the non-target distribution and leaves the target logit free.
  The paper's loss is :math:`H(y, z) + \lambda L` (:math:`\lambda = 0.1` on CIFAR-100, 1 on
  Tiny-ImageNet); ``scores`` are the votes of the dense predictions
  (:func:`dense_class_votes`).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> y, votes = jnp.array([[1., 0., 0.]]), jnp.array([[4., 2., 0.]])  # q = (0, 3/5, 2/5)
  >>> z = jnp.array([[7., jnp.log(3.), jnp.log(2.)]])  # the target logit does not matter
  >>> abs(float(losses.zipf_ls_loss(z, y, votes)[0])) < 1e-6
  True

  Args:
    logits: ``[B, C]`` logits.
    labels: ``[B, C]`` one-hot labels.
    scores: ``[B, C]`` per-class scores that rank the classes (gradients stopped).
    power: exponent of the rank (1).

  Returns:
    ``[B]`` float32 per-example loss.
  """
  logits, labels = _as_float32(logits, 'logits'), _as_float32(labels, 'labels')
  _check_shapes(logits=logits, labels=labels)
  targets = zipf_targets(scores, labels, power=power)
  is_label = labels > 0
  log_others = jax.nn.log_softmax(jnp.where(is_label, -jnp.inf, logits), axis=-1)
  # q is positive off the label; the label's entry (0 * -inf) is left out explicitly.
  kl = jnp.where(is_label, 0.0, targets * (jnp.log(jnp.where(is_label, 1.0, targets)) - log_others))
  return jnp.sum(kl, axis=-1)
