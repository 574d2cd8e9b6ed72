r"""Start-up: seconds from launching a run to its first training step, and a finished run's reprint.

A study runs the same config with several seeds, one process each. This times the second run of
a config, with another seed than the first, each sample a fresh Python process (from launch to
the first step's results, so imports, data loading, initialisation and compilation all count):

* before: no persistent compilation cache, as every run started before it existed (each process
  compiles every program; the seed was then part of them too);
* after: the command line's persistent compilation cache (``skd_jax.compilation_cache``), filled
  by one earlier run of another seed.

The two are launched in interleaved rounds (before, after, before, ...), every round with a new
seed, so that machine noise hits both alike. Then a finished workdir's reprint: ``python -m
skd_jax.main`` on a finished run (after: ``summary.json`` is read) against what the command line
did before (before: ``train.train_and_evaluate`` on the finished workdir without a cache, which
loads the data, builds and compiles the job and evaluates again). Prints the median seconds and
their ratio.

The data are the first --train_examples and --test_examples images of the offline Fashion-MNIST
(the Debian package ``dataset-fashion-mnist``), written to a temporary folder.

  pip install -e . && python benchmarks/startup.py          # baseline:quick, 2 epochs, 3 rounds
  python benchmarks/startup.py --config_name=pskd --rounds=5
"""

import ast
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import timing

_CONFIG = flags.DEFINE_string(
    'config_name', 'baseline', 'Config file in configs/ (its quick setup).'
)
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved rounds of (before, after).')
_EPOCHS = flags.DEFINE_integer('num_epochs', 2, 'Epochs of the finished run that is reprinted.')
_TRAIN = flags.DEFINE_integer('train_examples', 2000, 'Training images.')
_TEST = flags.DEFINE_integer('test_examples', 500, 'Test images.')
_OVERRIDES = flags.DEFINE_multi_string(
    'override', [], 'KEY=VALUE: an extra --config.KEY=VALUE of every run (e.g. for a smoke test).'
)
_CHILD = flags.DEFINE_string('child', None, 'Internal: the JSON arguments of one timed process.')


def _config(args):
  """The config of a timed process (``args`` from :func:`_timed_child`)."""
  config = timing.load_config(args['config'], 'quick')
  config.data.dir = args['data']
  config.seed = args['seed']
  config.num_epochs = args['num_epochs']
  for override in args['overrides']:
    key, _, text = override.partition('=')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _child(args):
  """One timed process: the first step (``first_step``) or a finished run's summary (``slow``)."""
  from skd_jax import compilation_cache  # pylint: disable=g-import-not-at-top
  from skd_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  compilation_cache.enable(args['cache'])
  config = _config(args)
  if args['what'] == 'first_step':
    job = train.build_job(config)
    jax.block_until_ready(job.step(job.state, 0))
  else:
    train.train_and_evaluate(config, args['workdir'])
  print(json.dumps({'done': time.time()}))


def _launch(argv, env=None):
  """Seconds from launching ``argv`` to the time it prints as ``done`` (or to its exit)."""
  env = {**os.environ, **(env or {})}
  start = time.time()
  proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
  end = time.time()
  if proc.returncode:
    raise RuntimeError(f'{" ".join(argv)} failed:\n{proc.stderr}')
  for line in proc.stdout.splitlines():
    if line.startswith('{"done"'):
      return json.loads(line)['done'] - start
  return end - start


def _timed_child(**args):
  args.update(config=_CONFIG.value, num_epochs=_EPOCHS.value, overrides=_OVERRIDES.value)
  return _launch([sys.executable, __file__, f'--child={json.dumps(args)}'])


def _write_subset(directory):
  """The first images of Fashion-MNIST's splits, as idx files in ``directory``."""
  from skd_jax.data import idx  # pylint: disable=g-import-not-at-top

  for split, name, count in (('train', 'train', _TRAIN.value), ('test', 't10k', _TEST.value)):
    images, labels = idx.load_fashion_mnist(idx.FASHION_MNIST_DIR, split)
    for kind, array in (('images-idx3', images[:count]), ('labels-idx1', labels[:count])):
      array = np.asarray(array).reshape((count,) + tuple(np.shape(array)[1:3]))
      shape = b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
      with open(os.path.join(directory, f'{name}-{kind}-ubyte'), 'wb') as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + shape + array.astype(np.uint8).tobytes())


def main(argv):
  del argv
  if _CHILD.value:
    _child(json.loads(_CHILD.value))
    return
  with tempfile.TemporaryDirectory() as tmp:
    data, cache = os.path.join(tmp, 'data'), os.path.join(tmp, 'cache')
    os.makedirs(data)
    _write_subset(data)
    common = dict(data=data, what='first_step')
    _timed_child(**common, seed=0, cache=cache)  # the first run: fills the cache
    before, after = [], []
    for seed in range(1, _ROUNDS.value + 1):
      before.append(_timed_child(**common, seed=seed, cache='off'))
      after.append(_timed_child(**common, seed=seed + 1000, cache=cache))

    # A finished run, then its reprint both ways.
    workdir = os.path.join(tmp, 'finished')
    overrides = [f'--config.{o}' for o in _OVERRIDES.value]
    cli = [
        sys.executable,
        '-m',
        'skd_jax.main',
        f'--config={os.path.join(timing.ROOT, "configs", _CONFIG.value)}.py:quick',
        f'--workdir={workdir}',
        f'--config.data.dir={data}',
        f'--config.num_epochs={_EPOCHS.value}',
        *overrides,
    ]
    env = {'SKD_JAX_COMPILATION_CACHE': cache}
    _launch(cli, env)
    slow, fast = [], []
    for _ in range(_ROUNDS.value):
      slow.append(_timed_child(data=data, what='slow', seed=0, cache='off', workdir=workdir))
      fast.append(_launch(cli, env))

  print(
      f'{_CONFIG.value}:quick on {_TRAIN.value:,} + {_TEST.value:,} Fashion-MNIST images; '
      f'{_ROUNDS.value} rounds; seconds, median (all)'
  )
  rows = [
      ('to the first step, another seed', before, after),
      ('finished workdir, summary', slow, fast),
  ]
  print(f'{"":<34} {"before":>8} {"after":>8} {"ratio":>6}')
  for name, b, a in rows:
    mb, ma = statistics.median(b), statistics.median(a)
    print(f'{name:<34} {mb:8.2f} {ma:8.2f} {mb / ma:6.1f}   ({_fmt(b)} | {_fmt(a)})')


def _fmt(samples):
  return ' '.join(f'{s:.1f}' for s in samples)


if __name__ == '__main__':
  app.run(main)
