"""What the benchmarks share: loading a config file and timing compiled train steps in rounds.

Timing in interleaved rounds (job 1, job 2, ..., job 1, ...) lets machine noise hit every job
alike, so ratios between jobs measured in one run are meaningful even on a busy machine.
"""

import importlib.util
import os
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  """``get_config(arg)`` of ``configs/<name>.py``."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def interleaved(jobs, *, steps, rounds):
  """Seconds per train step of each ``skd_jax.train.Job``, one sample per round.

  Every job first runs one step (compiled and warm). Each round then runs ``steps`` steps of each
  job in turn, waiting for the last one's results.

  Returns:
    ``{name: [seconds per step in round 1, round 2, ...]}`` for ``jobs = {name: job}``.
  """
  states = {}
  for name, job in jobs.items():
    state, measured = job.step(job.state, 0)
    jax.block_until_ready(measured)
    states[name] = (1, state)
  times = {name: [] for name in jobs}
  for _ in range(rounds):
    for name, job in jobs.items():
      step, state = states[name]
      start = time.perf_counter()
      for _ in range(steps):
        state, measured = job.step(state, step)
        step += 1
      jax.block_until_ready((state, measured))
      times[name].append((time.perf_counter() - start) / steps)
      states[name] = (step, state)
  return times
