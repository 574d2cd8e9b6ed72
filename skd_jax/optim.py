"""The optimizer and its learning-rate schedule, from the ``optim`` section of a config."""

import ml_collections
import optax


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
  # Weight decay added to the gradient before momentum: PyTorch SGD's semantics, applied to every
  # parameter (BatchNorm and biases included) as in the reference implementations.
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov),
  )
