"""MixSKD's pure loss (METHODS.md §3.11) against the official code (golden/mixskd.npz, written by
golden/make_mixskd.py from winycg/Self-KD-Lib's ``main_mixskd_cifar.py``). No term yet: the
loss only."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import losses

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'mixskd.npz'
EXITS = 4


@pytest.mark.parametrize('script', ['cifar', 'imagenet'])
def test_loss_and_gradients_are_the_official_ones(script):
  """The batch mean of ours is the official step's loss (CIFAR: without the MixCE terms;
  ImageNet: with them), and its gradients w.r.t. every exit's logits and maps and the
  self-teacher's outputs agree, with the official (frozen, random) discriminators."""
  with np.load(GOLDEN) as data:
    g = dict(data)
  bs = len(g['labels'])
  discriminators = [tuple(g[f'd{k}_{p}'] for p in ('w1', 'b1', 'w2', 'b2')) for k in range(EXITS)]
  mix_ce = script == 'imagenet'

  def batch_loss(zs, fs, t_hat, t_tilde):
    per_example = losses.mixskd_loss(
        [z[:bs] for z in zs],
        [z[bs:] for z in zs],
        [f[:bs] for f in fs],
        [f[bs:] for f in fs],
        t_hat,
        t_tilde,
        g['labels'],
        lam=float(g['lam']),
        perm=g['perm'],
        temperature=float(g['kd_T']),
        mix_ce=mix_ce,
        discriminators=discriminators,
    )
    assert per_example.shape == (bs,)
    return jnp.mean(per_example)

  args = (
      [jnp.asarray(g[f'z{k}']) for k in range(EXITS)],
      [jnp.asarray(g[f'f{k}']) for k in range(EXITS)],
      jnp.asarray(g['t_hat']),
      jnp.asarray(g['t_tilde']),
  )
  loss, grads = jax.value_and_grad(batch_loss, argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(float(loss), g['loss_imagenet' if mix_ce else 'loss'], rtol=1e-5)
  prefix = 'gi_' if mix_ce else 'g_'
  wanted = (
      [g[f'{prefix}z{k}'] for k in range(EXITS)],
      [g[f'{prefix}f{k}'] for k in range(EXITS)],
      g[f'{prefix}t_hat'],
      g[f'{prefix}t_tilde'],
  )
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(wanted)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max() + 1e-12)
  jitted = jax.jit(batch_loss)(*args)
  np.testing.assert_allclose(jitted, loss, rtol=1e-6)


def test_an_unmixed_batch_has_no_distillation_feature_or_mixup_terms():
  """lam = 1 and the identity pairing: the mixture of outputs is the originals' outputs; with
  mixed outputs equal to it, only the cross-entropies remain."""
  key = iter(jax.random.split(jax.random.key(0), 8))
  z = [jax.random.normal(next(key), (3, 5)) * 2 for _ in range(2)]
  f = [jax.random.normal(next(key), (3, 2, 2, 4)) for _ in range(2)]
  y, perm = jnp.array([0, 1, 2]), jnp.arange(3)
  ce = lambda s: -jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], -1)[:, 0]
  got = losses.mixskd_loss(z, z, f, f, z[-1], z[-1], y, lam=1.0, perm=perm, mix_ce=False)
  np.testing.assert_allclose(got, ce(z[0]) + ce(z[1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.mixskd_mix(f[0], 0.25, perm[::-1]), 0.25 * f[0] + 0.75 * f[0][::-1]
  )
