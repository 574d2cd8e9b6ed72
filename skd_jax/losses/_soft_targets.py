"""Soft-target mixing losses: build a target distribution, then take its cross-entropy.

All functions take arrays, keyword-only hyperparameters, and return per-example values (one per
row) without reducing over the batch. Logits of any float dtype are upcast to float32 so that
bfloat16 models still get stable, accurate losses.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import optax


def _as_float32(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  """``x`` as float32; a TypeError naming the argument ``name`` if it is not floating-point."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    hint = ''
    if name in ('labels', 'one_hot', 'targets'):
      hint = '; one-hot rows of integer class indices: jax.nn.one_hot(labels, num_classes)'
    raise TypeError(
        f'{name}: expected a floating-point array, got {x.dtype.name}{list(x.shape)}{hint}'
    )
  return x.astype(jnp.float32)


def _as_indices(x: jax.typing.ArrayLike, name: str) -> jax.Array:
  """``x`` as int32; a TypeError naming ``name`` if it is not integer (a float would truncate)."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f'{name}: expected integer class indices, got {x.dtype.name}{list(x.shape)}')
  return x.astype(jnp.int32)


def _check_number(
    value, name: str, *, low: float, high: float = math.inf, open_low=False, open_high=False
) -> None:
  """A ValueError naming ``name`` if ``value``, a Python or NumPy number, is outside its range.

  Arrays (traced ones included) pass unchecked: under ``jit`` a check would need a callback.
  """
  if not isinstance(value, numbers.Real):
    return
  open_high = open_high or high == math.inf
  above = low < value if open_low else low <= value
  below = value < high if open_high else value <= high
  if not (above and below):  # NaN fails both
    interval = f'{"(" if open_low else "["}{low:g}, {high:g}{")" if open_high else "]"}'
    raise ValueError(f'{name}: expected a number in {interval}, got {value!r}')


def _check_temperature(temperature) -> None:
  """A ValueError unless a concrete ``temperature`` is > 0 (at 0 every softened loss is NaN)."""
  _check_number(temperature, 'temperature', low=0, open_low=True)


def _check_shapes(**arrays: jax.Array) -> None:
  """A ValueError naming the arguments (keywords, in order) unless all have one shape."""
  shapes = [f'{name} {tuple(x.shape)}' for name, x in arrays.items()]
  if len({tuple(x.shape) for x in arrays.values()}) > 1:
    listed = ', '.join(shapes[:-1]) + f' and {shapes[-1]}'
    raise ValueError(f'{listed} must have one shape')


def soft_target_cross_entropy(
    logits: jax.typing.ArrayLike, targets: jax.typing.ArrayLike
) -> jax.Array:
  r"""Cross-entropy of logits against a target distribution.

  .. math::
    H(q, z) = -\sum_c q_c \log \mathrm{softmax}(z)_c

  computed with ``log_softmax`` (never ``log(softmax)``), so logits of magnitude 50 or more stay
  finite in float32 and bfloat16. Gradients flow into ``targets`` too; stop them at the caller when
  the targets come from the model itself.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> float(losses.soft_target_cross_entropy(jnp.zeros((1, 2)), jnp.array([[1., 0.]]))[0])
  0.6931...

  Args:
    logits: ``[..., C]`` unnormalised scores.
    targets: ``[..., C]`` target probabilities (rows summing to one).

  Returns:
    ``[...]`` float32 per-example cross-entropy.
  """
  logits, targets = _as_float32(logits, 'logits'), _as_float32(targets, 'targets')
  _check_shapes(logits=logits, targets=targets)
  return optax.losses.softmax_cross_entropy(logits, targets)


def label_smoothing_targets(
    labels: jax.typing.ArrayLike, *, epsilon: float, variant: str = 'uniform'
) -> jax.Array:
  r"""Smoothed targets from one-hot labels (label smoothing, Szegedy et al., CVPR 2016).

  ``variant='uniform'`` (the common form, and optax's):
  :math:`q = (1-\epsilon)\,y + \epsilon / C`, so the true class gets
  :math:`1 - \epsilon + \epsilon/C`.

  ``variant='non_target'`` (TF-KD / Zipf's LS code): the true class gets :math:`1-\epsilon`, every
  other class :math:`\epsilon / (C-1)`.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.label_smoothing_targets(jnp.array([[1., 0., 0.]]), epsilon=0.3)
  Array([[0.8, 0.1, 0.1]], dtype=float32)
  >>> losses.label_smoothing_targets(jnp.array([[1., 0., 0.]]), epsilon=0.3, variant='non_target')
  Array([[0.7 , 0.15, 0.15]], dtype=float32)

  Args:
    labels: ``[..., C]`` one-hot labels.
    epsilon: smoothing mass in ``[0, 1]``.
    variant: ``'uniform'`` or ``'non_target'``.

  Returns:
    ``[..., C]`` float32 targets.
  """
  _check_number(epsilon, 'epsilon', low=0, high=1)
  labels = _as_float32(labels, 'labels')
  num_classes = labels.shape[-1]
  if variant == 'uniform':
    return optax.smooth_labels(labels, epsilon)
  if variant == 'non_target':
    return (1.0 - epsilon) * labels + epsilon / (num_classes - 1) * (1.0 - labels)
  raise ValueError(f"variant: expected 'uniform' or 'non_target', got {variant!r}")


def label_smoothing_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    epsilon: float = 0.1,
    variant: str = 'uniform',
) -> jax.Array:
  r"""Cross-entropy against label-smoothed targets: :math:`H(\mathrm{LS}_\epsilon(y), z)`.

  See :func:`label_smoothing_targets` for the two variants. ``epsilon=0`` is plain cross-entropy.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> round(float(losses.label_smoothing_cross_entropy(jnp.zeros((1, 3)), jnp.eye(3)[:1])[0]), 4)
  1.0986

  Args:
    logits: ``[..., C]`` unnormalised scores.
    labels: ``[..., C]`` one-hot labels.
    epsilon: smoothing mass, 0.1 in the papers.
    variant: ``'uniform'`` or ``'non_target'``.

  Returns:
    ``[...]`` float32 per-example loss.
  """
  targets = label_smoothing_targets(labels, epsilon=epsilon, variant=variant)
  return soft_target_cross_entropy(logits, targets)


def pskd_alpha(epoch: jax.typing.ArrayLike, *, alpha_T: float, num_epochs: int) -> jax.Array:
  r"""PS-KD's linearly growing mixing weight (Kim et al., ICCV 2021, Eq. 4).

  .. math::
    \alpha_t = \alpha_T \cdot \frac{t + 1}{E}

  with 0-based epoch :math:`t` and :math:`E` total epochs, so the last epoch uses
  :math:`\alpha_T`.

  >>> from skd_jax import losses
  >>> round(float(losses.pskd_alpha(9, alpha_T=0.8, num_epochs=300)), 4)  # epoch 10 of 300
  0.0267

  Args:
    epoch: 0-based epoch (integer scalar or array; may be traced).
    alpha_T: final weight in ``[0, 1]`` (0.8 in the paper).
    num_epochs: total number of epochs ``E``.

  Returns:
    float32 weight(s) of ``epoch``'s shape.
  """
  return alpha_T * (jnp.asarray(epoch, jnp.float32) + 1.0) / num_epochs


def pskd_targets(
    labels: jax.typing.ArrayLike,
    past_predictions: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike,
) -> jax.Array:
  r"""PS-KD targets: the label mixed with the model's prediction from the previous epoch.

  .. math::
    \hat y_i = (1 - \alpha_t)\, y_i + \alpha_t\, P_{\mathrm{idx}_i}

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.pskd_targets(jnp.array([[1., 0.]]), jnp.array([[0.6, 0.4]]), alpha=0.5)
  Array([[0.8, 0.2]], dtype=float32)

  Args:
    labels: ``[B, C]`` one-hot labels.
    past_predictions: ``[B, C]`` the rows ``P[idx]`` of the per-example history (softmax outputs of
      the previous epoch; one-hot labels during epoch 0). Gradients are stopped.
    alpha: mixing weight :math:`\alpha_t`, scalar or ``[B]`` (see :func:`pskd_alpha`).

  Returns:
    ``[B, C]`` float32 targets.
  """
  labels = _as_float32(labels, 'labels')
  past = jax.lax.stop_gradient(_as_float32(past_predictions, 'past_predictions'))
  _check_shapes(labels=labels, past_predictions=past)
  _check_number(alpha, 'alpha', low=0, high=1)
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.shape not in ((), labels.shape[:-1]):
    raise ValueError(f'alpha: expected a scalar or shape {labels.shape[:-1]}, got {alpha.shape}')
  if alpha.ndim:
    alpha = alpha[..., None]
  return (1.0 - alpha) * labels + alpha * past


def pskd_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    past_predictions: jax.typing.ArrayLike,
    *,
    alpha: jax.typing.ArrayLike,
) -> jax.Array:
  r"""Progressive self-knowledge distillation loss (PS-KD; Kim et al., ICCV 2021).

  .. math::
    L_i = H\big((1 - \alpha_t)\, y_i + \alpha_t\, \mathrm{sg}(P_{\mathrm{idx}_i}),\; z_i\big)

  No temperature and no separate cross-entropy term. ``alpha=0`` is exactly cross-entropy.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> y = jnp.array([[1., 0.]]); past = jnp.array([[0.5, 0.5]])
  >>> float(losses.pskd_cross_entropy(jnp.zeros((1, 2)), y, past, alpha=0.8)[0])
  0.6931...

  Args:
    logits: ``[B, C]`` logits of the current forward pass.
    labels: ``[B, C]`` one-hot labels.
    past_predictions: ``[B, C]`` history rows for the batch's examples.
    alpha: mixing weight, scalar or ``[B]``.

  Returns:
    ``[B]`` float32 per-example loss.
  """
  targets = pskd_targets(labels, past_predictions, alpha=alpha)
  return soft_target_cross_entropy(logits, targets)
