"""Compact per-example distributions: keep the k largest probabilities, rebuild the rest uniformly.

A history of predictions over ``N`` examples and ``C`` classes (PS-KD's ``P``) costs ``4 N C``
bytes in float32. Keeping only each row's ``k`` largest probabilities (bfloat16) and their class
indices (int16 while ``C <= 32767``, else int32) costs ``4 N k`` or ``6 N k`` bytes.
"""

import jax
import jax.numpy as jnp

INT16_MAX_CLASSES = 32767  # class indices 0 .. C - 1 fit int16 up to this many classes


def index_dtype(num_classes: int) -> jnp.dtype:
  """int16 when every class index of ``num_classes`` classes fits it, else int32.

  >>> from skd_jax import losses
  >>> losses.index_dtype(1000), losses.index_dtype(21841), losses.index_dtype(32768)
  (dtype('int16'), dtype('int16'), dtype('int32'))
  """
  return jnp.dtype(jnp.int16 if num_classes <= INT16_MAX_CLASSES else jnp.int32)


def compress_top_k(probs: jax.typing.ArrayLike, *, k: int) -> tuple[jax.Array, jax.Array]:
  r"""The ``k`` largest probabilities of each row and their classes.

  Classes are ordered by decreasing probability; of equal probabilities the lower class comes
  first (``jax.lax.top_k``), so the result is deterministic. :func:`expand_top_k` rebuilds a
  distribution from it.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> indices, values = losses.compress_top_k(jnp.array([[0.125, 0.5, 0.125, 0.25]]), k=2)
  >>> indices, values
  (Array([[1, 3]], dtype=int16), Array([[0.5, 0.25]], dtype=bfloat16))

  Args:
    probs: ``[..., C]`` probabilities (rows summing to one), any float dtype.
    k: number of classes kept, ``1 <= k < C``.

  Returns:
    ``(indices, values)``: ``[..., k]`` class indices (:func:`index_dtype`) and ``[..., k]``
    bfloat16 probabilities.
  """
  probs = jnp.asarray(probs)
  num_classes = probs.shape[-1]
  if not 1 <= k < num_classes:
    raise ValueError(f'k: expected an integer in [1, {num_classes - 1}], got {k!r}')
  values, indices = jax.lax.top_k(probs.astype(jnp.float32), k)
  return indices.astype(index_dtype(num_classes)), values.astype(jnp.bfloat16)


def expand_top_k(
    indices: jax.typing.ArrayLike, values: jax.typing.ArrayLike, *, num_classes: int
) -> jax.Array:
  r"""The distribution whose ``k`` kept classes have ``values``, the rest sharing what remains.

  With kept classes :math:`K` (distinct indices, :math:`|K| = k < C`), values :math:`v_j` and
  :math:`s = \sum_j v_j`:

  .. math::
    q_c = \begin{cases} v_j / \max(s, 1) & c = \mathrm{indices}_j \in K \\
                        \max(1 - s, 0) / (C - k) & c \notin K \end{cases}

  so every row sums to one: the missing mass :math:`1 - s` is spread uniformly over the other
  :math:`C - k` classes, and a sum above one (rounding of bfloat16 values) is normalised away.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.expand_top_k(jnp.array([[1, 3]]), jnp.array([[0.5, 0.25]]), num_classes=4)
  Array([[0.125, 0.5  , 0.125, 0.25 ]], dtype=float32)

  Args:
    indices: ``[..., k]`` distinct class indices per row (as from :func:`compress_top_k`).
    values: ``[..., k]`` their probabilities, any float dtype.
    num_classes: ``C``.

  Returns:
    ``[..., C]`` float32 probabilities.
  """
  indices, values = jnp.asarray(indices), jnp.asarray(values, jnp.float32)
  k = values.shape[-1]
  if indices.shape != values.shape or not 1 <= k < num_classes:
    raise ValueError(
        f'indices {indices.shape} and values {values.shape}: expected one shape [..., k] with '
        f'1 <= k < num_classes = {num_classes}'
    )
  total = jnp.sum(values, axis=-1, keepdims=True)
  rest = jnp.maximum(1.0 - total, 0.0) / (num_classes - k)
  dense = jnp.broadcast_to(rest, (*values.shape[:-1], num_classes))
  return jnp.put_along_axis(
      dense, indices.astype(jnp.int32), values / jnp.maximum(total, 1.0), axis=-1, inplace=False
  )
