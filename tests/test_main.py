"""The command line: one-line errors with exit status 2 and an untouched workdir; SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_idx(path, array):
  header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape
  )
  with open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def tiny_fashion_mnist(tmp_path_factory):
  """Fashion-MNIST-format idx files with 96 train and 32 test images."""
  directory = tmp_path_factory.mktemp('fmnist')
  rng = np.random.default_rng(0)
  for split, n in (('train', 96), ('t10k', 32)):
    _write_idx(directory / f'{split}-images-idx3-ubyte', rng.integers(0, 256, (n, 28, 28)))
    _write_idx(directory / f'{split}-labels-idx1-ubyte', np.arange(n) % 10)
  return str(directory)


def _main(*args, devices=1, **kwargs):
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), 'PYTHONPATH': REPO}
  return subprocess.Popen(
      [sys.executable, '-m', 'skd_jax.main', *args],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      **kwargs,
  )


@pytest.mark.parametrize(
    'args, devices, message',
    [
        (
            ['--config.data.source=tfds', '--config.data.name=no_such_dataset'],
            1,
            'data.name: unknown TFDS dataset',
        ),
        (['--config.model.name=resnet9000'], 1, 'model.name: unknown model'),
        (['--config.no_such_key=1'], 1, "--config: unknown key 'no_such_key'"),
        (['--config.loss.pskd.alpha_T=1.5'], 1, 'loss.pskd.alpha_T: expected a number in [0, 1]'),
        (['--config.batch_size=12'], 8, 'batch_size: 12 is not divisible by the 8 devices'),
        (['--config.data.dir=/no/such/dir'], 1, 'data.dir: /no/such/dir does not exist'),
        (['--config.optim.schedule=linear'], 1, "optim.schedule: expected 'step' or 'cosine'"),
    ],
)
def test_invalid_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, devices, message):
  workdir = tmp_path / 'wd'
  proc = _main('--config=configs/pskd.py:quick', f'--workdir={workdir}', *args, devices=devices)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, stderr
  assert not workdir.exists()


def test_missing_config_file_exits_2(tmp_path):
  proc = _main('--config=configs/nope.py', f'--workdir={tmp_path / "wd"}')
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2 and stderr.strip().splitlines()[-1].startswith('error: ')


def test_sigterm_saves_exits_cleanly_and_rerun_finishes(tmp_path, tiny_fashion_mnist):
  workdir = tmp_path / 'wd'
  args = (
      '--config=configs/pskd.py:quick',
      f'--workdir={workdir}',
      f'--config.data.dir={tiny_fashion_mnist}',
      '--config.batch_size=8',
      '--config.num_epochs=20',
      '--config.log_every_steps=1',
  )
  proc = _main(*args)
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 180
  while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  assert 'SIGTERM: saved a checkpoint at step' in stderr
  assert not (workdir / 'summary.json').exists()
  saved = [int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()]
  assert saved and max(saved) < 20 * 12

  proc = _main(*args)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 20 * 12 and json.loads(stdout) == summary
