r"""Where a train step's time goes: its pieces timed in interleaved rounds in one process.

For one config (default: the quick baseline, the small ResNet on Fashion-MNIST, batch 128), times

* ``augment``: gathering a batch from the on-device data and its random crop + flip;
* ``forward``: the student's training-mode forward pass (BatchNorm statistics updated);
* ``fwd+bwd``: forward, cross-entropy and the gradient;
* ``fwd+bwd+sgd``: that plus the optimizer update (the config's SGD) of the train state;
* ``step_no_aug``: the trainer's compiled step with the augmentation off;
* ``step``: the trainer's compiled step as the config trains;

and prints each one's median seconds and its fraction of ``step``. Run it under different
``XLA_FLAGS`` to see what a flag changes.

  python benchmarks/step_breakdown.py
  XLA_FLAGS=--xla_cpu_use_thunk_runtime=false python benchmarks/step_breakdown.py --rounds=7
"""

import statistics
from typing import Any, Callable, NamedTuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax
import timing

from skd_jax import train
from skd_jax.data import pipeline

_CONFIG = flags.DEFINE_string('config', 'baseline', 'Config file in configs/.')
_ARG = flags.DEFINE_string('arg', 'quick', 'Argument passed to get_config.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Batch size.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed block.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median block counts.')


class Piece(NamedTuple):
  """Duck-types ``skd_jax.train.Job`` for ``timing.interleaved``: a state and a step on it."""

  state: Any
  step: Callable[[Any, int], tuple[Any, Any]]


def _pieces(job, crop_padding, flip, batch_size):
  """The pieces below the trainer's step, on a fixed batch of the job's training data."""
  images = job.source.data.images[:batch_size]
  labels = job.source.data.labels[:batch_size]
  networks = job.networks

  def loss(params, batch_stats):
    logits, _, batch_stats = networks.apply_student(params, batch_stats, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), batch_stats

  augment = jax.jit(
      lambda key, data: pipeline.augment(
          key, data.images[:batch_size], crop_padding=crop_padding, flip=flip
      )
  )
  forward = jax.jit(lambda s: networks.apply_student(s.params, s.batch_stats, images))
  grad = jax.jit(lambda s: jax.value_and_grad(loss, has_aux=True)(s.params, s.batch_stats))

  @jax.jit
  def update(s):
    (_, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(s.params, s.batch_stats)
    return s.apply_gradients(grads=grads, batch_stats=batch_stats)

  key = jax.random.key(0)
  data = job.source.data
  state = jax.tree.map(jnp.copy, job.state)  # the trainer's step donates job.state
  return {
      'augment': Piece(None, lambda s, i: (s, augment(jax.random.fold_in(key, i), data))),
      'forward': Piece(state, lambda s, i: (s, forward(s))),
      'fwd+bwd': Piece(state, lambda s, i: (s, grad(s))),
      'fwd+bwd+sgd': Piece(state, lambda s, i: (update(s), jnp.zeros(()))),
  }


def main(argv):
  del argv
  config = timing.load_config(_CONFIG.value, _ARG.value or None)
  config.batch_size = _BATCH.value
  crop_padding, flip = config.data.crop_padding, config.data.flip
  job = train.build_job(config)
  config.data.crop_padding, config.data.flip = 0, False
  jobs = _pieces(job, crop_padding, flip, _BATCH.value)
  jobs['step_no_aug'] = train.build_job(config)
  jobs['step'] = job
  times = timing.interleaved(jobs, steps=_STEPS.value, rounds=_ROUNDS.value)
  full = statistics.median(times['step'])
  print(
      f'{jax.device_count()} x {jax.devices()[0].device_kind}, {_CONFIG.value}:{_ARG.value}, '
      f'batch {_BATCH.value}, {_ROUNDS.value} rounds x {_STEPS.value} steps'
  )
  print(f'{"piece":<12} {"s":>8} {"of step":>8}')
  for name, samples in times.items():
    median = statistics.median(samples)
    print(f'{name:<12} {median:8.4f} {median / full:8.3f}')


if __name__ == '__main__':
  app.run(main)
