"""AdamW (Loshchilov and Hutter, ICLR 2019) as an optimizer from outside skd_jax.

  config.optim.module = 'skd_plugins.adamw'
  config.optim.lr = 1e-3  # the peak of skd_jax's schedule (optim.schedule, warm-up)
  config.optim.weight_decay = 0.05  # decoupled: p <- p - lr_t * wd * p, not added to the gradient

``optim.b1`` and ``optim.b2`` (0.9 and 0.999 when absent) set the moment decays; SGD's keys
(``optim.momentum``, ``optim.nesterov``) are ignored.
"""

import optax


def make(optim, schedule) -> optax.GradientTransformation:
  """AdamW with the learning rate ``schedule(step)`` and the settings of ``optim``."""
  return optax.adamw(
      learning_rate=schedule,
      b1=float(optim.get('b1', 0.9)),
      b2=float(optim.get('b2', 0.999)),
      weight_decay=float(optim.weight_decay),
  )
