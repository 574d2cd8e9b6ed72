"""The input pipeline that runs inside the compiled step: order, batches, augmentation.

The whole (small) dataset lives on every device as uint8. Per epoch one permutation of the
training split is drawn from ``(seed, epoch)``; each step slices its batch out of it, gathers the
images on the device, and augments them there, so the host does no per-step data work and a
resumed run sees exactly the same batches.

An epoch has ``ceil(N / B)`` steps. The last batch is filled up with the first examples of the
epoch's permutation, marked invalid: they take part in the forward pass (and so in BatchNorm's
batch statistics) but get zero loss weight and never write per-example state, so every example
counts exactly once per epoch, as with PyTorch's ``drop_last=False``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  return math.ceil(num_examples / batch_size)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 NHWC images scaled to [0, 1]."""
  pixels = images.reshape(-1, images.shape[-1])
  mean = pixels.mean(axis=0, dtype=np.float64) / 255.0
  sq = np.zeros_like(mean)
  for start in range(0, len(pixels), 1 << 22):  # chunks keep float64 copies small
    sq += ((pixels[start : start + (1 << 22)] / 255.0 - mean) ** 2).sum(axis=0)
  return mean.astype(np.float32), np.sqrt(sq / len(pixels)).astype(np.float32)


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


def augment(key: jax.Array, images: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per example (uint8 in and out).

  Zero padding of the raw pixels matches torchvision's ``RandomCrop(size, padding)`` applied
  before ``ToTensor``/``Normalize``.
  """
  batch, height, width, channels = images.shape
  crop_key, flip_key = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * p + 1)
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (height, width, channels))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


def normalize(images: jax.Array, mean: np.ndarray, std: np.ndarray, dtype=jnp.float32):
  """uint8 images to ``(x / 255 - mean) / std`` in ``dtype``."""
  x = images.astype(jnp.float32) / 255.0
  return ((x - mean) / std).astype(dtype)
