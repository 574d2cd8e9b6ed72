r"""Train-step time of each method relative to the cross-entropy baseline, measured in one run.

Builds every config's job (same data, backbone and batch), compiles its train step, then times
the steps in interleaved rounds (baseline, method 1, method 2, ..., baseline, ...) so that machine
noise hits every method alike. Prints the median seconds per step, images per second and the
ratio to the baseline's median.

  pip install -e . && python benchmarks/step_time.py  # quick configs (Fashion-MNIST, CPU-sized)
  python benchmarks/step_time.py --steps=20 --rounds=5 --configs=baseline,drg,lsskd
  python benchmarks/step_time.py --configs=baseline,teacher_kd --teacher=/tmp/baseline_quick
  python benchmarks/step_time.py --arg='' --configs=baseline,lightskd   # paper setups, CIFAR-100
"""

import statistics

from absl import app
from absl import flags
import jax
import timing

from skd_jax import train

_CONFIGS = flags.DEFINE_list(
    'configs',
    [
        'baseline',
        'drg',
        'dsr',
        'lightskd',
        'pskd_dsr_drg',
        'lsskd',
        'cskd',
        'dlb',
        'sd_dropout',
        'beta_smoothing',
        'uskd',
        'tfkd_reg',
        'zipf_ls',
        'bake',
        'byot',
        'dks',
        'frskd',
        'ddgsd',
        'mixskd',
    ],
    'Config files in configs/ to time; the first is the reference.',
)
_ARG = flags.DEFINE_string('arg', 'quick', 'Argument passed to every get_config.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed block.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median block counts.')

_TEACHER = flags.DEFINE_string(
    'teacher', '', "teacher.workdir of the configs with a teacher_kd term (an earlier run's)"
)


def _config(name):
  config = timing.load_config(name, _ARG.value or None)
  if 'teacher_kd' in config.loss:
    config.teacher.workdir = _TEACHER.value
  return config


def main(argv):
  del argv
  configs = {name: _config(name) for name in _CONFIGS.value}
  jobs = {name: train.build_job(config) for name, config in configs.items()}
  times = timing.interleaved(jobs, steps=_STEPS.value, rounds=_ROUNDS.value)
  reference = statistics.median(times[_CONFIGS.value[0]])
  print(
      f'{jax.device_count()} x {jax.devices()[0].device_kind}, '
      f'{_ROUNDS.value} rounds x {_STEPS.value} steps'
  )
  print(f'{"config":<14} {"s/step":>8} {"img/s":>8} {"ratio":>6}')
  for name, samples in times.items():
    median = statistics.median(samples)
    print(
        f'{name:<14} {median:8.4f} {configs[name].batch_size / median:8.0f} '
        f'{median / reference:6.2f}'
    )


if __name__ == '__main__':
  app.run(main)
