"""MixSKD: self-knowledge distillation from mixup (Yang et al., ECCV 2022; arXiv 2208.05768).

Every batch ``x`` gets a second view, its mixup ``x~ = lam x + (1 - lam) x[perm]`` (float, uint8
pixel scale; one ``lam ~ Beta(alpha, alpha)`` per batch, ``perm`` a permutation), drawn by
:func:`draws` from the term's key of the step; the loss redraws the same ``lam`` and ``perm``
from ``inputs.key``. The trainer lays the views out example-major and makes one call of the
network over all ``2B`` images, so BatchNorm's batch statistics are those of ``[x; x~]``
together, as the official ``2B`` forward.

The network is the backbone plus the head kind ``'mixskd'`` (``skd_jax.models.mixskd``): branches
``k = 1 .. N-1`` re-instantiating stages ``k+1 .. N`` with their final maps ``F_k`` and logits
``z_k``, the backbone's ``F_N = outputs['stage<N>']`` and logits ``z_N``, and the self-teacher
``h`` over ``F_1 .. F_N``. Its outputs (``'<name>'`` the teacher's logits, ``'<name>/branch<k>'``,
``'<name>/map<k>'``) are read for both views. ``h`` is affine in its maps (1x1 conv without
bias or activation, pooling, Dense), so the teacher of the mixture of maps is the mixture of the
originals' teacher outputs, ``t^ = h(F^) = mixskd_mix(h(F), lam, perm)``, and ``t~ = h(F~)`` is
the head's output on the mixed view: :func:`skd_jax.losses.mixskd_loss` with the ``K = N`` exits
(branches first, the backbone last). The term includes every exit's cross-entropy: do not add a
``cross_entropy`` term. ``mix_ce`` (default True, METHODS.md §3.11, the ImageNet script's loss)
adds the mixup cross-entropies, the self-teacher's only training signal: the official CIFAR script
leaves them out (``configs/mixskd.py`` follows it), so its self-teacher never learns. With them,
two of three runs of the small ResNet at lr 0.1 without warm-up collapsed to chance in the
noisy-label study (docs/methods.md).

The discriminators (``discriminators=True``) are the official ones' stand-in: fixed random
``Linear(d, 128) -> ReLU -> Linear(128, 2)`` per exit, never trained, drawn from a fixed key
(:data:`DISCRIMINATOR_SEED`) with PyTorch's default ``Linear`` init (``U(+-1/sqrt(fan_in))`` for
weights and biases): constants of the run, the same across steps and resumes (the official ones
are re-drawn at every start, METHODS.md §3.11 pitfall 2).

Reference code: winycg/Self-KD-Lib @ ede3062 ``main_mixskd_cifar.py`` L114-201.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms
from skd_jax.errors import ConfigError

DISCRIMINATOR_SEED = 0
_HIDDEN = 128


def draws(key: jax.Array, batch: int, alpha: float) -> tuple[jax.Array, jax.Array]:
  """``(lam, perm)`` of a step from the term's key: ``lam ~ Beta(alpha, alpha)`` a float32
  scalar, ``perm`` a permutation of ``range(batch)``."""
  if key is None:
    raise ValueError('mixskd: the mixed view and the loss need the term key of the step')
  lam_key, perm_key = jax.random.split(key)
  lam = jax.random.beta(lam_key, alpha, alpha).astype(jnp.float32)
  return lam, jax.random.permutation(perm_key, batch)


def make_discriminators(dims: list[int]) -> list[tuple[jax.Array, ...]]:
  """The fixed discriminators ``(w1 [d, 128], b1, w2 [128, 2], b2)``, one per exit of width
  ``d``, with PyTorch's ``nn.Linear`` default init, from :data:`DISCRIMINATOR_SEED`."""
  key = jax.random.key(DISCRIMINATOR_SEED)
  made = []
  for k, d in enumerate(dims):
    keys = jax.random.split(jax.random.fold_in(key, k), 4)
    uniform = lambda key, shape, fan_in: jax.random.uniform(
        key, shape, jnp.float32, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in)
    )
    made.append(
        (
            uniform(keys[0], (d, _HIDDEN), d),
            uniform(keys[1], (_HIDDEN,), d),
            uniform(keys[2], (_HIDDEN, 2), _HIDDEN),
            uniform(keys[3], (2,), _HIDDEN),
        )
    )
  return made


@dataclasses.dataclass(frozen=True)
class MixSKD(terms.LossTerm):
  """``weight * mixskd_loss(...)`` over the original and the mixed view at the ``N`` exits."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  alpha: float = terms.setting(0.4, low=1e-3, high=1e3)
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  mix_ce: bool = terms.setting(True)
  discriminators: bool = terms.setting(True)
  name: str = 'mixskd'
  num_views = 2

  def check(self, context):
    if not context.num_stages or context.num_stages < 2:
      raise ConfigError(
          f'loss.{self.name}: the model needs at least 2 numbered stages for the branches'
      )

  def heads(self):
    stages = tuple(range(1, self.num_stages + 1))
    return (terms.HeadRequest(self.name, 0, 'mixskd', self.num_classes, stages=stages),)

  def make_views(self, images, key=None):
    lam, perm = draws(key, images.shape[0], self.alpha)
    x = images.astype(jnp.float32)
    return jnp.stack([x, losses.mixskd_mix(x, lam, perm)], axis=1)

  def exits(self, views) -> tuple[list[jax.Array], list[jax.Array]]:
    """The ``N`` exits' ``[B, 2, C]`` logits and ``[B, 2, H, W, D]`` maps, branches first."""
    branches = range(1, self.num_stages)
    logits = [views[f'{self.name}/branch{k}'] for k in branches] + [views['logits']]
    maps = [views[f'{self.name}/map{k}'] for k in branches]
    return logits, maps + [views[f'stage{self.num_stages}']]

  def __call__(self, inputs, rows=None, carry=None):
    lam, perm = draws(inputs.key, inputs.labels.shape[0], self.alpha)
    logits, maps = self.exits(inputs.views)
    teacher = inputs.views[self.name]
    loss = losses.mixskd_loss(
        [z[:, 0] for z in logits],
        [z[:, 1] for z in logits],
        [f[:, 0] for f in maps],
        [f[:, 1] for f in maps],
        losses.mixskd_mix(teacher[:, 0], lam, perm),  # h(F^), h being affine
        teacher[:, 1],
        inputs.labels,
        lam=lam,
        perm=perm,
        temperature=self.temperature,
        mix_ce=self.mix_ce,
        discriminators=(
            make_discriminators([f.shape[-1] for f in maps]) if self.discriminators else None
        ),
    )
    top1 = lambda z: 100.0 * (jnp.argmax(z, -1) == inputs.labels).astype(jnp.float32)
    metrics = {f'{self.name}/lam': lam, f'{self.name}/teacher_top1': top1(teacher[:, 0])}
    for k in range(1, self.num_stages):
      metrics[f'{self.name}/branch{k}_top1'] = top1(logits[k - 1][:, 0])
    return terms.TermOutput(loss, metrics=metrics)
