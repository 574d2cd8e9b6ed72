"""A test term from outside the package (``loss.mix = dict(module='random_views', ...)``): a
mixup view drawn from the term's key, whose loss redraws the same coefficient and pairing.

View 1 of example ``i`` is ``lam x_i + (1 - lam) x_perm(i)`` (float, uint8 pixel scale), with
``lam ~ U(0, 1)`` and ``perm`` a permutation drawn from the key; the loss is the mixup
cross-entropy of view 1's logits, ``lam CE(z, y_i) + (1 - lam) CE(z, y_perm(i))``, and the
metric ``mix/lam`` lets a test see the draws.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import terms


def draws(key, batch):
  """``(lam, perm)`` of a step, from the term's key."""
  lam_key, perm_key = jax.random.split(key)
  return jax.random.uniform(lam_key), jax.random.permutation(perm_key, batch)


@dataclasses.dataclass(frozen=True)
class Mix(terms.LossTerm):
  weight: float = 1.0
  name: str = 'mix'
  num_views = 2

  def make_views(self, images, key=None):
    lam, perm = draws(key, images.shape[0])
    x = images.astype(jnp.float32)
    return jnp.stack([x, lam * x + (1.0 - lam) * x[perm]], axis=1)

  def __call__(self, inputs, rows=None, carry=None):
    lam, perm = draws(inputs.key, inputs.labels.shape[0])
    log_p = jax.nn.log_softmax(inputs.views['logits'][:, 1])
    pick = lambda y: jnp.take_along_axis(log_p, y[:, None], -1)[:, 0]
    loss = -(lam * pick(inputs.labels) + (1.0 - lam) * pick(inputs.labels[perm]))
    return terms.TermOutput(loss, metrics={'mix/lam': lam})


def make(settings, context):
  del context
  return Mix(weight=float(settings.weight))
