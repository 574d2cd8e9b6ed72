"""Image transforms: augmentation of uint8 batches and normalisation, traceable and per example.

A source (``skd_jax.data.sources``) augments; a model's forward pass normalises with the mean and
standard deviation of the split it was trained on (``skd_jax.networks``).
"""

import jax
import jax.numpy as jnp
import numpy as np


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 NHWC images scaled to [0, 1]."""
  pixels = images.reshape(-1, images.shape[-1])
  mean = pixels.mean(axis=0, dtype=np.float64) / 255.0
  sq = np.zeros_like(mean)
  for start in range(0, len(pixels), 1 << 22):  # chunks keep float64 copies small
    sq += ((pixels[start : start + (1 << 22)] / 255.0 - mean) ** 2).sum(axis=0)
  return mean.astype(np.float32), np.sqrt(sq / len(pixels)).astype(np.float32)


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
