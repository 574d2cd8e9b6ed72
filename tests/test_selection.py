"""data.train_examples and data.label_noise: a class-balanced subset and symmetric label noise,
the same through both pipelines, recorded in the workdir, resumed exactly."""

import importlib
import json
import logging

import jax
import ml_collections
import numpy as np
import pytest

import runs
from skd_jax import config_lib
from skd_jax import data as data_lib
from skd_jax import preemption
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.data import selection
from skd_jax.data import sources
from skd_jax.data import streaming
from skd_jax.errors import ConfigError


def _labels(n=300, num_classes=5, seed=0):
  """Unbalanced labels: class c about 1.5 times as frequent as class c - 1."""
  rng = np.random.default_rng(seed)
  weights = 1.5 ** np.arange(num_classes)
  return rng.choice(num_classes, n, p=weights / weights.sum()).astype(np.int32)


def _data_config(**options):
  config = config_lib.base_config(quick=True)
  for key, value in options.items():
    config.data[key] = value
  return config


def test_the_subset_is_class_balanced_fixed_by_its_seed_and_nested():
  labels = _labels()
  subset = selection.balanced_subset(labels, 5, 50, seed=0)
  assert subset.shape == (50,) and np.all(np.diff(subset) > 0)  # ascending, no repeats
  np.testing.assert_array_equal(np.bincount(labels[subset], minlength=5), [10] * 5)
  np.testing.assert_array_equal(selection.balanced_subset(labels, 5, 50, seed=0), subset)
  assert not np.array_equal(selection.balanced_subset(labels, 5, 50, seed=1), subset)
  smaller = selection.balanced_subset(labels, 5, 25, seed=0)
  assert set(smaller) <= set(subset)


@pytest.mark.parametrize('n, rate', [(10, 0.25), (10, 0.3), (299, 0.4), (1000, 0.001), (7, 0.0)])
def test_noise_changes_exactly_round_rate_n_labels_each_to_another_class(n, rate):
  clean = _labels(n)
  noisy = selection.symmetric_noise(clean, 5, rate, seed=3)
  assert noisy.dtype == np.int32 and noisy.shape == clean.shape
  assert np.sum(noisy != clean) == int(np.floor(rate * n + 0.5))  # halves round up: 2.5 -> 3
  np.testing.assert_array_equal(selection.symmetric_noise(clean, 5, rate, seed=3), noisy)
  if np.sum(noisy != clean) > 1:
    assert not np.array_equal(selection.symmetric_noise(clean, 5, rate, seed=4), noisy)


def test_noise_is_uniform_over_the_other_classes_and_a_higher_rate_extends_a_lower_one():
  clean = np.arange(40_000, dtype=np.int32) % 4
  noisy = selection.symmetric_noise(clean, 4, 0.5, seed=0)
  shift = (noisy - clean)[noisy != clean] % 4
  np.testing.assert_allclose(
      np.bincount(shift, minlength=4) / shift.size, [0, 1 / 3, 1 / 3, 1 / 3], atol=0.01
  )  # 20,000 draws: the std of each share is 0.0033
  lower = selection.symmetric_noise(clean, 4, 0.2, seed=0)
  changed = lower != clean
  np.testing.assert_array_equal(noisy[changed], lower[changed])


def test_choose_draws_the_subset_then_the_noise_independently_of_the_run_seed():
  labels = _labels()
  config = _data_config(train_examples=50, subset_seed=2, label_noise=0.2, noise_seed=5)
  chosen = selection.choose(config.data, labels, 5)
  np.testing.assert_array_equal(chosen.indices, selection.balanced_subset(labels, 5, 50, 2))
  np.testing.assert_array_equal(chosen.clean_labels, labels[chosen.indices])
  np.testing.assert_array_equal(
      chosen.labels, selection.symmetric_noise(chosen.clean_labels, 5, 0.2, 5)
  )
  assert chosen.flipped == 10
  config.seed = 7  # the run's seed plays no part
  np.testing.assert_array_equal(selection.choose(config.data, labels, 5).labels, chosen.labels)
  identity = data_lib.identity(config.data, chosen.labels, chosen)
  assert identity['examples'] == 50 and identity['labels_sha256'] == selection.sha256(chosen.labels)
  assert identity['subset'] == {
      'of': 300,
      'seed': 2,
      'indices_sha256': selection.sha256(chosen.indices),
  }
  assert identity['label_noise'] == {
      'rate': 0.2,
      'seed': 5,
      'flipped': 10,
      'clean_labels_sha256': selection.sha256(chosen.clean_labels),
  }
  assert 'subset of 300 (seed 2); 20% symmetric label noise (seed 5): 10 labels' in (
      chosen.describe()
  )
  # Without the options a training set's identity is what it always was (older data.json match).
  plain = _data_config()
  assert set(data_lib.identity(plain.data, labels)) == {
      'source',
      'name',
      'split',
      'examples',
      'labels_sha256',
  }


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('train_examples', -10, 'expected an integer >= 0'),
        ('subset_seed', -1, 'expected an integer >= 0'),
        ('label_noise', 1.0, 'expected a fraction in [0, 1)'),
        ('label_noise', -0.1, 'expected a fraction in [0, 1)'),
        ('noise_seed', -1, 'expected an integer >= 0'),
    ],
)
def test_invalid_values_are_refused_in_one_line_naming_the_field(key, value, message):
  config = _data_config()
  with config.unlocked():
    config.data[key] = value
  with pytest.raises(ConfigError) as e:
    config_lib.validate(config, device_count=1)
  assert str(e.value).startswith(f'data.{key}: {message}') and '\n' not in str(e.value)


@pytest.mark.parametrize(
    'count, message',
    [
        (52, '52 is not divisible by the 5 classes; expected a multiple of 5'),
        (150, '150 needs 30 examples of each of the 5 classes, but class 0 has'),
    ],
)
def test_a_subset_the_split_cannot_give_is_refused_in_one_line(count, message):
  with pytest.raises(ConfigError) as e:
    selection.choose(_data_config(train_examples=count).data, _labels(), 5)
  assert str(e.value).startswith(f'data.train_examples: {message}') and '\n' not in str(e.value)


def test_both_pipelines_train_on_the_same_examples_and_labels_and_test_on_the_whole_split(
    tmp_path,
):
  config = _data_config(train_examples=40, label_noise=0.25, subset_seed=1, noise_seed=2)
  config.data.dir = runs.fashion_mnist(tmp_path, 60, 16)
  whole = data_lib.load_split(config.data, 'train')
  dataset = selection.select_dataset(config.data, whole)
  mesh = train.make_mesh(jax.devices()[:1])
  records, test, _, _ = streaming.open_splits(config.data, mesh, 8)
  chosen = dataset.selection
  assert len(records) == len(dataset.labels) == 40 and chosen.flipped == 10
  np.testing.assert_array_equal(records.selection.indices, chosen.indices)
  np.testing.assert_array_equal(records.labels, dataset.labels)
  images, labels = records.read(np.arange(40))
  np.testing.assert_array_equal(images, dataset.images)
  np.testing.assert_array_equal(images, whole.images[chosen.indices])
  np.testing.assert_array_equal(labels, chosen.labels)
  assert np.sum(labels != whole.labels[chosen.indices]) == 10
  # The test split: every example, the clean labels.
  test_labels = np.concatenate([b['labels'] for b in map(test._reader, range(test.num_batches))])
  np.testing.assert_array_equal(test_labels[:16], data_lib.load_split(config.data, 'test').labels)

  # Each source's batches carry the noisy labels of the subset's examples, and CS-KD's partners
  # share the noisy label of their anchor.
  options = dict(seed=0, batch_size=8, groups=('partner',))
  device = sources.OnDeviceSource(dataset.images, dataset.labels, 10, mesh, **options)
  host = streaming.StepReader(records, **options, crop_padding=0, flip=False, share=slice(0, 8))
  for step in range(6):
    on_device = jax.device_get(jax.jit(device.batch)(step, *device.step_args(step)))
    on_host = host(step)
    for batch in (on_device, on_host):
      main, partner = batch['main'], batch['partner']
      main = main if isinstance(main, dict) else vars(main)
      partner = partner if isinstance(partner, dict) else vars(partner)
      np.testing.assert_array_equal(main['labels'], chosen.labels[main['index']])
      np.testing.assert_array_equal(partner['labels'], main['labels'])
    np.testing.assert_array_equal(
        on_host['main']['images'], dataset.images[on_host['main']['index']]
    )


def test_a_run_resumes_only_with_the_same_subset_and_noise(tmp_path):
  config = _data_config(train_examples=40, label_noise=0.2)
  workdir_lib.Workdir(tmp_path, config, is_main=True).begin(0)
  for key, value in (
      ('label_noise', 0.3),
      ('noise_seed', 1),
      ('train_examples', 50),
      ('subset_seed', 1),
  ):
    changed = _data_config(**{'train_examples': 40, 'label_noise': 0.2, key: value})
    with pytest.raises(ConfigError, match=f'different config: data.{key} '):
      workdir_lib.Workdir(tmp_path, changed, is_main=True)


@pytest.mark.slow
def test_a_run_with_a_subset_and_noise_records_them_and_resumes_bit_identically(
    tmp_path, monkeypatch, caplog
):
  """PS-KD (a per-example history, indexed by position in the subset) on 40 of 60 examples with
  10 noisy labels: 2 epochs of 5 steps, preempted at step 7 and resumed."""
  data = runs.fashion_mnist(tmp_path, 60, 16)
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.data.dir, config.num_epochs, config.batch_size, config.eval_batch_size = data, 2, 8, 8
  config.data.train_examples, config.data.label_noise, config.data.noise_seed = 40, 0.25, 3
  config.model.widths, config.log_every_steps = (4, 8, 8), 2
  devices = jax.devices()[:2]
  with caplog.at_level(logging.INFO, logger='skd_jax.train'):
    train.train_and_evaluate(config, str(tmp_path / 'straight'), devices)
  assert 'fashion_mnist, 40 training (train, device pipeline; a class-balanced subset of 60' in (
      caplog.text
  )
  assert '25% symmetric label noise (seed 3): 10 labels changed) and 16 test' in caplog.text
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)
    with pytest.raises(train.Preempted, match='at step 7'):
      train.train_and_evaluate(config, str(tmp_path / 'resumed'), devices)
  train.train_and_evaluate(config, str(tmp_path / 'resumed'), devices)

  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 10)
  _, expected = runs.restore(tmp_path / 'straight', 10)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  assert np.asarray(state['rows']['pskd']).shape[0] == 40  # one history row per subset example

  chosen = selection.choose(config.data, data_lib.load_split(config.data, 'train').labels, 10)
  with open(tmp_path / 'resumed' / 'data.json') as f:
    recorded = json.load(f)
  assert recorded == data_lib.identity(config.data, chosen.labels, chosen)
  assert recorded['examples'] == 40 and recorded['label_noise']['flipped'] == 10
  assert recorded['subset']['of'] == 60
  for record in runs.records(tmp_path / 'straight', 'eval'):
    assert sum(record['reliability']['count']) <= 16
