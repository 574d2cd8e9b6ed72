"""Running the real trainer in tests: small configs on mocked TFDS data, and reading what it wrote."""

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds

from skd_jax import events
from skd_jax import export
from skd_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

NUM_EXAMPLES = 72  # 72 / 16 = 4.5: the last batch of every epoch is padded.
STEPS_PER_EPOCH = 5


def config(name='pskd', **overrides):
  """``configs/<name>.py:quick`` on mocked CIFAR-10: 2 epochs of 5 steps, a record every 2 steps."""
  c = importlib.import_module(f'configs.{name}').get_config('quick')
  c.data.source = 'tfds'
  c.data.name = 'cifar10'
  c.data.dir = ''
  c.num_epochs = 2
  c.batch_size = 16
  c.eval_batch_size = 32
  c.log_every_steps = 2
  for key, value in overrides.items():
    c[key] = value
  return c


def run(c, workdir, devices=8):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(c, str(workdir), devices=jax.devices()[:devices])


def records(workdir, kind=None):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if kind in (None, r['kind'])]


def without_time(records_):
  return [{k: v for k, v in r.items() if k != 'train_seconds'} for r in records_]


def event_scalars(records_):
  """``(step, tag, value)`` of the records' scalars as the event files hold them (float32)."""
  return [
      (r['step'], tag, float(np.float32(v)))
      for r in records_
      for tag, v in events.scalars(r).items()
  ]


def restore(workdir, step=None):
  """``(step, state)`` of a checkpoint (default: the latest), as saved."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, restored.state


def fashion_mnist(directory, num_train, num_test):
  """Writes Fashion-MNIST-format idx files of random images into ``directory``; returns it."""
  rng = np.random.default_rng(0)
  for split, n in (('train', num_train), ('t10k', num_test)):
    for kind, array in (
        ('images-idx3', rng.integers(0, 256, (n, 28, 28))),
        ('labels-idx1', np.arange(n) % 10),
    ):
      shape = b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
      with open(os.path.join(directory, f'{split}-{kind}-ubyte'), 'wb') as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + shape + array.astype(np.uint8).tobytes())
  return str(directory)


def untrained_teacher(directory) -> str:
  """Exports an untrained small ResNet of another width for :func:`config`'s data into
  ``directory``; returns it (any fixed network will do as a frozen teacher in a test)."""
  spec = export.ModelSpec(
      name='small_resnet',
      options={'dtype': 'float32', 'strides': (2, 2, 2), 'widths': (8, 8, 8)},
      num_classes=10,
      input_shape=(32, 32, 3),
      mean=(0.5, 0.5, 0.5),
      std=(0.25, 0.25, 0.25),
  )
  variables = spec.module().init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)
  export.save_model(os.path.join(directory, 'model'), spec=spec, **variables)
  return str(directory)
