"""PS-KD: progressive self-knowledge distillation (Kim et al., ICCV 2021).

The history ``P`` (``[N, C]``, one row per training example) is this term's per-example state.
It starts as the one-hot labels, so epoch 0 trains on the labels exactly as the official code
(which writes ``P[idx] = y`` before use). Each step reads ``P[idx]`` for the targets and returns
``sg(softmax(z))`` of the same forward pass (pre-update parameters, T = 1) as the batch's new
rows; the trainer writes them after the update. A prediction therefore first serves as a target
one epoch later: targets lag one epoch, and a sample never teaches itself within a step.

``storage`` chooses how the rows are kept (in device memory and in every checkpoint):

* ``'float32'``: the ``[N, C]`` probabilities (``4 N C`` bytes; the official code's history).
* ``'bfloat16'``: the same in bfloat16 (``2 N C`` bytes); a read row is renormalised to sum to 1.
* ``'top_k'``: each row's ``top_k`` largest probabilities, ``{'indices': [N, k] int16 (int32
  above 32,767 classes), 'values': [N, k] bfloat16}`` (``4 N k`` bytes with int16); a read row
  spreads the remaining mass uniformly over the other ``C - k`` classes
  (:func:`skd_jax.losses.expand_top_k`). The initial rows are the one-hot labels exactly.

``python benchmarks/history_memory.py`` prints what each costs for CIFAR-100 and ImageNet.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms
from skd_jax.errors import ConfigError

STORAGES = ('float32', 'bfloat16', 'top_k')


@dataclasses.dataclass(frozen=True)
class PSKD(terms.LossTerm):
  """``weight * H((1 - a_t) y + a_t P[idx], z)`` with ``a_t = alpha_T (t + 1) / E``."""

  num_classes: int
  num_epochs: int
  weight: float = 1.0
  alpha_T: float = terms.setting(0.8, low=0, high=1)
  storage: str = terms.setting('float32', choices=STORAGES)
  # Classes kept per row with storage 'top_k', fewer than the classes (check).
  top_k: int = terms.setting(5, low=1)
  name: str = 'pskd'

  def check(self, context):
    if self.storage == 'top_k' and self.top_k >= context.num_classes:
      raise ConfigError(
          f'loss.{self.name}.top_k: expected an integer in [1, {context.num_classes - 1}] '
          f'(fewer than the {context.num_classes} classes), got {self.top_k!r}'
      )

  def init_rows(self, labels):
    if self.storage != 'top_k':
      return jax.nn.one_hot(labels, self.num_classes, dtype=self.storage)
    # What encode(one_hot(labels)) gives, without building [N, C]: the label with probability 1,
    # then the k - 1 lowest other classes with 0 (top_k's order for ties).
    others = jnp.arange(self.top_k - 1)[None, :]
    others = others + (others >= labels[:, None])
    indices = jnp.concatenate([labels[:, None], others], axis=1)
    values = jnp.zeros(indices.shape, jnp.bfloat16).at[:, 0].set(1)
    return {'indices': indices.astype(losses.index_dtype(self.num_classes)), 'values': values}

  def encode(self, probs: jax.Array):
    """Rows in the storage format from ``[B, C]`` float32 probabilities."""
    if self.storage != 'top_k':
      return probs.astype(self.storage)
    indices, values = losses.compress_top_k(probs, k=self.top_k)
    return {'indices': indices, 'values': values}

  def decode(self, rows) -> jax.Array:
    """``[B, C]`` float32 probabilities (rows summing to 1) from rows in the storage format."""
    if self.storage == 'float32':
      return rows
    if self.storage == 'bfloat16':
      rows = rows.astype(jnp.float32)
      return rows / jnp.sum(rows, axis=-1, keepdims=True)
    return losses.expand_top_k(rows['indices'], rows['values'], num_classes=self.num_classes)

  def __call__(self, inputs, rows=None, carry=None):
    alpha = losses.pskd_alpha(inputs.epoch, alpha_T=self.alpha_T, num_epochs=self.num_epochs)
    loss = losses.pskd_cross_entropy(inputs.logits, inputs.one_hot, self.decode(rows), alpha=alpha)
    new_rows = self.encode(jax.lax.stop_gradient(jax.nn.softmax(inputs.logits.astype(jnp.float32))))
    return terms.TermOutput(loss, rows=new_rows, metrics={'pskd/alpha': alpha})
