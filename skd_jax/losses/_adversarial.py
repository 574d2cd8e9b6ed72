"""Adversarial losses on a discriminator's logits (AI-KD; Kim et al., arXiv 2211.10938).

A discriminator ``D`` maps a ``C``-class probability vector to one logit ``d``, the log-odds that
the vector comes from the "real" distribution (the frozen pre-trained model's predictions) rather
than the "fake" one (the student's). Both losses are binary cross-entropies on ``sigma(d)``,
computed as ``softplus`` of the logit, which is finite for any finite logit. Every function
upcasts to float32 and returns one value per example.
"""

import jax

from skd_jax.losses._soft_targets import _as_float32
from skd_jax.losses._soft_targets import _check_shapes


def adversarial_loss(fake_logits: jax.typing.ArrayLike) -> jax.Array:
  r"""The student's adversarial loss: BCE of the discriminator's verdict on it against "real".

  .. math::
    L = \mathrm{BCE}\big(\sigma(d_{fake}), 1\big) = -\log \sigma(d_{fake})
      = \mathrm{softplus}(-d_{fake})

  with :math:`d_{fake} = D(\mathrm{softmax}(z))` for the student's logits :math:`z` (the
  non-saturating generator loss of Goodfellow et al., 2014). Its gradient reaches the student
  through :math:`d_{fake}`; the discriminator's parameters are not trained by it.

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.adversarial_loss(jnp.array([0., 100.]))  # log 2 when D cannot tell; 0 when fooled
  Array([0.6931472, 0.       ], dtype=float32)

  Args:
    fake_logits: ``[...]`` discriminator logits of the student's probabilities.

  Returns:
    ``[...]`` float32 per-example loss.
  """
  return jax.nn.softplus(-_as_float32(fake_logits, 'fake_logits'))


def discriminator_loss(
    real_logits: jax.typing.ArrayLike, fake_logits: jax.typing.ArrayLike
) -> jax.Array:
  r"""The discriminator's loss: "real" for the pre-trained model, "fake" for the student.

  .. math::
    L_D = \mathrm{BCE}\big(\sigma(d_{real}), 1\big) + \mathrm{BCE}\big(\sigma(d_{fake}), 0\big)
        = \mathrm{softplus}(-d_{real}) + \mathrm{softplus}(d_{fake})

  with :math:`d_{real} = D(\mathrm{softmax}(z_{pre}))` and
  :math:`d_{fake} = D(\mathrm{sg}\,\mathrm{softmax}(z))`, one pair per example (the sum of the two
  BCE means of the usual GAN discriminator once the caller averages over examples).

  >>> import jax.numpy as jnp
  >>> from skd_jax import losses
  >>> losses.discriminator_loss(jnp.array([0., 100.]), jnp.array([0., -100.]))  # 2 log 2; 0
  Array([1.3862944, 0.       ], dtype=float32)

  Args:
    real_logits: ``[...]`` discriminator logits of the pre-trained model's probabilities.
    fake_logits: ``[...]`` discriminator logits of the student's probabilities, same shape.

  Returns:
    ``[...]`` float32 per-example loss.
  """
  real, fake = _as_float32(real_logits, 'real_logits'), _as_float32(fake_logits, 'fake_logits')
  _check_shapes(real_logits=real, fake_logits=fake)
  return jax.nn.softplus(-real) + jax.nn.softplus(fake)
