r"""Train-step time of each method relative to the cross-entropy baseline, measured in one run.

Builds every config's job (same data, backbone and batch), compiles its train step, then times
the steps in interleaved rounds (baseline, method 1, method 2, ..., baseline, ...) so that machine
noise hits every method alike. Prints the median seconds per step, images per second and the
ratio to the baseline's median.

  pip install -e . && python benchmarks/step_time.py  # quick configs (Fashion-MNIST, CPU-sized)
  python benchmarks/step_time.py --steps=20 --rounds=5 --configs=baseline,drg,lsskd
  python benchmarks/step_time.py --arg='' --configs=baseline,lightskd   # paper setups, CIFAR-100
"""

import importlib.util
import os
import statistics
import time

from absl import app
from absl import flags
import jax

from skd_jax import train

_CONFIGS = flags.DEFINE_list(
    'configs',
    ['baseline', 'drg', 'dsr', 'lightskd', 'pskd_dsr_drg', 'lsskd'],
    'Config files in configs/ to time; the first is the reference.',
)
_ARG = flags.DEFINE_string('arg', 'quick', 'Argument passed to every get_config.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed block.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median block counts.')

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(_ARG.value or None)


def main(argv):
  del argv
  configs = {name: _config(name) for name in _CONFIGS.value}
  jobs, states, orders = {}, {}, {}
  for name, config in configs.items():
    jobs[name] = train.build_job(config)
    orders[name] = jobs[name].order_fn(jobs[name].order_key, 0)
    state, measured = jobs[name].step_fn(jobs[name].state, orders[name], jobs[name].train)
    jax.block_until_ready(measured)  # compiled and warm
    states[name] = state
  times = {name: [] for name in jobs}
  for _ in range(_ROUNDS.value):
    for name, job in jobs.items():
      state = states[name]
      start = time.perf_counter()
      for _ in range(_STEPS.value):
        state, measured = job.step_fn(state, orders[name], job.train)
      jax.block_until_ready((state, measured))
      times[name].append((time.perf_counter() - start) / _STEPS.value)
      states[name] = state
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
