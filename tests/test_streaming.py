"""The host-streaming source: shares, samplers, random access to the files, and exact resume."""

import gzip
import importlib
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
from skd_jax import data as data_lib
from skd_jax import preemption
from skd_jax import train
from skd_jax.data import idx
from skd_jax.data import streaming
from skd_jax.errors import ConfigError

N, B = 72, 16


class _Records:
  """In-memory records that remember which examples were read."""

  num_classes = 5
  image_shape = (8, 8, 1)

  def __init__(self):
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (N, 8, 8, 1)).astype(np.uint8)
    self.labels = rng.integers(0, 5, N).astype(np.int32)
    self.read_indices = []

  def __len__(self):
    return N

  def read(self, index):
    self.read_indices.extend(int(i) for i in index)
    return self.images[index], self.labels[index]


def _reader(records, share=slice(0, B), **options):
  return streaming.StepReader(
      records,
      seed=0,
      batch_size=B,
      groups=('main', 'partner', 'previous'),
      crop_padding=2,
      flip=True,
      share=share,
      **options,
  )


def test_every_example_once_per_epoch_partners_of_the_same_class_and_the_previous_step():
  records = _Records()
  reader = _reader(records)
  steps = [reader(s) for s in range(2 * reader.steps_per_epoch)]
  for epoch in range(2):
    mains = steps[epoch * 5 : (epoch + 1) * 5]
    seen = np.concatenate([m['main']['index'][m['main']['valid']] for m in mains])
    np.testing.assert_array_equal(np.sort(seen), np.arange(N))
  for s, batch in enumerate(steps):
    np.testing.assert_array_equal(
        records.labels[batch['partner']['index']], batch['main']['labels']
    )
    previous = batch['previous']
    if s == 0:
      assert not previous['valid'].any()
    else:
      np.testing.assert_array_equal(previous['index'], steps[s - 1]['main']['index'])
      np.testing.assert_array_equal(previous['valid'], steps[s - 1]['main']['valid'])
  assert batch['main']['images'].dtype == np.uint8 and batch['main']['images'].shape == (B, 8, 8, 1)


def test_each_process_reads_only_its_share_and_the_shares_make_the_whole_batch():
  whole = _reader(_Records())(7)
  shares = []
  for share in (slice(0, 8), slice(8, 16)):  # two processes
    records = _Records()
    shares.append(_reader(records, share=share)(7))
    wanted = np.concatenate([shares[-1][g]['index'] for g in ('main', 'partner', 'previous')])
    assert sorted(records.read_indices) == sorted(wanted.tolist())
  for group in ('main', 'partner', 'previous'):
    for key in ('index', 'valid', 'labels', 'images'):
      np.testing.assert_array_equal(
          np.concatenate([s[group][key] for s in shares]), whole[group][key]
      )


def test_a_step_depends_on_the_step_alone():
  walked = _reader(_Records())
  for s in range(9):
    walked(s)
  fresh = _reader(_Records())(8)
  again = walked(8)
  for group in fresh:
    if group != 'step':
      for key in fresh[group]:
        np.testing.assert_array_equal(fresh[group][key], again[group][key])


def _write_idx(path, array, compress):
  shape = b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
  data = bytes([0, 0, 0x08, array.ndim]) + shape + array.astype(np.uint8).tobytes()
  with open(path, 'wb') as f:
    f.write(gzip.compress(data) if compress else data)


@pytest.mark.parametrize('compress', [False, True])
def test_fashion_mnist_records_read_rows_from_plain_or_gzipped_files(tmp_path, compress):
  rng = np.random.default_rng(1)
  images, labels = rng.integers(0, 256, (30, 28, 28)), np.arange(30) % 10
  suffix = '.gz' if compress else ''
  _write_idx(tmp_path / f'train-images-idx3-ubyte{suffix}', images, compress)
  _write_idx(tmp_path / f'train-labels-idx1-ubyte{suffix}', labels, compress)
  records = idx.FashionMnistRecords(str(tmp_path), 'train')
  got_images, got_labels = records.read(np.array([3, 17, 3]))
  np.testing.assert_array_equal(got_images[..., 0], images[[3, 17, 3]])
  np.testing.assert_array_equal(got_labels, labels[[3, 17, 3]])
  if not compress:
    assert isinstance(records._images, idx.IdxRows)  # pylint: disable=protected-access
    restored = __import__('pickle').loads(__import__('pickle').dumps(records))
    assert restored._images is None  # pylint: disable=protected-access


def test_a_truncated_plain_idx_file_is_one_config_error(tmp_path):
  _write_idx(tmp_path / 'train-images-idx3-ubyte', np.zeros((4, 28, 28)), False)
  _write_idx(tmp_path / 'train-labels-idx1-ubyte', np.zeros(4), False)
  os.truncate(tmp_path / 'train-images-idx3-ubyte', 100)
  records = idx.FashionMnistRecords(str(tmp_path), 'train')
  with pytest.raises(ConfigError, match='IDX size does not match its header'):
    records.read(np.array([0]))


def test_tfds_records_read_single_examples_of_a_prepared_split():
  config = runs.config('baseline')
  with tfds.testing.mock_data(num_examples=runs.NUM_EXAMPLES):
    records = data_lib.open_records(config.data, 'train')
    whole = data_lib.load_split(config.data, 'train')
    images, labels = records.read(np.array([5, 0, 5]))
  assert (len(records), records.num_classes, records.image_shape) == (72, 10, (32, 32, 3))
  np.testing.assert_array_equal(images, whole.images[[5, 0, 5]])
  np.testing.assert_array_equal(labels, whole.labels[[5, 0, 5]])
  np.testing.assert_array_equal(records.labels, whole.labels)


def _host_config(fashion, workers=0):
  config = importlib.import_module('configs.pskd_dlb').get_config('quick')
  config.data.dir, config.num_epochs, config.batch_size = fashion, 2, 16
  config.data.pipeline, config.data.workers = 'host', workers
  config.log_every_steps = 2
  return config


@pytest.mark.slow
def test_a_host_streaming_run_resumes_bit_identically_and_workers_change_nothing(
    tmp_path, monkeypatch
):
  fashion = runs.fashion_mnist(tmp_path, 72, 32)
  devices = jax.devices()[:8]
  train.train_and_evaluate(_host_config(fashion), str(tmp_path / 'straight'), devices)
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)
    with pytest.raises(train.Preempted, match='at step 7'):
      train.train_and_evaluate(_host_config(fashion, workers=2), str(tmp_path / 'resumed'), devices)
  train.train_and_evaluate(_host_config(fashion, workers=2), str(tmp_path / 'resumed'), devices)
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 10)
  _, expected = runs.restore(tmp_path / 'straight', 10)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  shutil.rmtree(tmp_path / 'straight')
