"""Samplers: which training examples a step sees, from ``(seed, step)`` alone.

Every function here is pure and traceable, so a source can run it inside the compiled step (the
on-device source) or on the host (the streaming source), and every process computes the same
indices without talking to the others.

* :func:`epoch_order` / :func:`batch_slots` -- the main examples: one permutation of the split per
  epoch; step ``s`` takes slots ``[s * B, (s + 1) * B)`` of its epoch's permutation. An epoch has
  ``ceil(N / B)`` steps; the last batch is filled up with the first examples of the permutation,
  marked invalid (they take part in the forward pass, and so in BatchNorm's batch statistics, but
  get zero loss weight and never write per-example state), so every example counts exactly once
  per epoch, as with PyTorch's ``drop_last=False``.
* :func:`class_partners` -- CS-KD's partners: for every anchor one example of the same class,
  drawn uniformly with replacement (it may be the anchor itself).
* the previous step's main examples (DLB) are :func:`batch_slots` of step ``s - 1``; the source
  handles the epoch boundary and marks them invalid at step 0.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return math.ceil(num_examples / batch_size)


def epoch_order(
    key: jax.Array, epoch: jax.Array, *, num_examples: int, batch_size: int
) -> jax.Array:
  """The epoch's example order, ``[steps_per_epoch * batch_size]`` int32, padding wrapped."""
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  slots = steps_per_epoch(num_examples, batch_size) * batch_size
  return perm[jnp.arange(slots) % num_examples].astype(jnp.int32)


def batch_slots(
    order: jax.Array, step_in_epoch: jax.Array, *, num_examples: int, batch_size: int
) -> tuple[jax.Array, jax.Array]:
  """The step's example indices ``[B]`` and whether each slot is a real (non-padding) example."""
  start = step_in_epoch * batch_size
  index = jax.lax.dynamic_slice(order, (start,), (batch_size,))
  valid = start + jnp.arange(batch_size) < num_examples
  return index, valid


class ClassIndex(NamedTuple):
  """The split's examples grouped by class, for :func:`class_partners`.

  Attributes:
    by_class: ``[N]`` int32 example indices sorted by label (stable).
    start: ``[C]`` int32 position of each class's first example in ``by_class``.
    count: ``[C]`` int32 number of examples of each class.
  """

  by_class: np.ndarray
  start: np.ndarray
  count: np.ndarray


def class_index(labels: np.ndarray, num_classes: int) -> ClassIndex:
  labels = np.asarray(labels)
  count = np.bincount(labels, minlength=num_classes).astype(np.int32)
  start = (np.cumsum(count) - count).astype(np.int32)
  return ClassIndex(np.argsort(labels, kind='stable').astype(np.int32), start, count)


def class_partners(key: jax.Array, labels: jax.Array, classes: ClassIndex) -> jax.Array:
  """``[B]`` for each label one example of that class, uniform with replacement."""
  offset = jax.random.randint(key, labels.shape, 0, jnp.asarray(classes.count)[labels])
  return jnp.asarray(classes.by_class)[jnp.asarray(classes.start)[labels] + offset]
