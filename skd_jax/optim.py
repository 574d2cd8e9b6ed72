"""The optimizer and its learning-rate schedule, from the ``optim`` section of a config."""

import ml_collections
import optax

from skd_jax import plugins
from skd_jax.errors import ConfigError


def make_schedule(
    optim: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up, then step or cosine decay."""
  total = num_epochs * steps_per_epoch
  warmup = optim.warmup_epochs * steps_per_epoch
  if optim.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.lr,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=0.0,
    )
  # 'step': multiply by decay_factor at each boundary epoch (PyTorch's MultiStepLR).
  step_decay = optax.piecewise_constant_schedule(
      optim.lr, {b * steps_per_epoch: optim.decay_factor for b in optim.boundaries}
  )
  if not warmup:
    return step_decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), lambda s: step_decay(s + warmup)], [warmup]
  )


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """SGD as PyTorch's, or the optimizer of the plug-in ``optim.module`` (``skd_jax.plugins``).

  A plug-in module's ``make(optim, schedule)`` receives the whole ``optim`` section (its own
  keys included, e.g. ``optim.b2``) and the learning-rate schedule, and returns an
  ``optax.GradientTransformation``; weight decay is then its own business.

  Raises:
    ConfigError: ``optim.module`` does not import, has no ``make``, or its ``make`` returns no
      ``optax.GradientTransformation``.
  """
  if optim.get('module'):
    make = plugins.load(optim.module, 'optim.module')
    plugins.check_call(make, 'optim.module', optim, schedule)
    tx = make(optim, schedule)
    if not isinstance(tx, optax.GradientTransformation):
      raise ConfigError(
          f'optim.module: make() returned {type(tx).__name__}; expected an '
          'optax.GradientTransformation'
      )
    return tx
  # Weight decay added to the gradient before momentum: PyTorch SGD's semantics, applied to every
  # parameter (BatchNorm and biases included) as in the reference implementations.
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov),
  )
