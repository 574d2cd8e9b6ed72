"""The trainer end to end on mocked TFDS data: devices, PS-KD state, resume, failures."""

import dataclasses
import functools
import importlib
import json
import os
import sys
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

from skd_jax import data as data_lib
from skd_jax import losses
from skd_jax import models
from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax.data import pipeline
from skd_jax.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from configs import baseline as baseline_config  # pylint: disable=g-import-not-at-top
from configs import pskd as pskd_config  # pylint: disable=g-import-not-at-top
from configs import pskd_dsr_drg as pskd_dsr_drg_config  # pylint: disable=g-import-not-at-top

NUM_EXAMPLES = 72  # 72 / 16 = 4.5: the last batch of every epoch is padded.


def _config(module=pskd_config, **overrides):
  config = module.get_config('quick')
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.dir = ''
  config.num_epochs = 2
  config.batch_size = 16
  config.eval_batch_size = 32
  config.log_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


def _run(config, workdir, devices=8):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:devices])


def _records(workdir, kind):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == kind]


def _restore(workdir, step=None):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    step = manager.latest_step() if step is None else step
    return step, manager.restore(step, args=ocp.args.StandardRestore())


def test_trains_on_1_and_8_devices_with_the_same_losses(tmp_path):
  one = _run(_config(), tmp_path / 'one', devices=1)
  eight = _run(_config(), tmp_path / 'eight', devices=8)
  for summary in (one, eight):
    assert set(summary) == {
        'top1',
        'top5',
        'nll',
        'ece',
        'aurc',
        'eaurc',
        'best_top1',
        'best_epoch',
        'epochs',
        'steps',
        'train_seconds',
    }
    assert summary['steps'] == 2 * 5 and summary['epochs'] == 2
  # Global-batch BatchNorm: the device count changes only the floating-point reduction order.
  loss_one = [r['loss'] for r in _records(tmp_path / 'one', 'train')]
  loss_eight = [r['loss'] for r in _records(tmp_path / 'eight', 'train')]
  np.testing.assert_allclose(loss_one, loss_eight, rtol=2e-4)
  assert [r['step'] for r in _records(tmp_path / 'one', 'eval')] == [5, 10]
  with open(tmp_path / 'one' / 'summary.json') as f:
    assert json.load(f) == one


def test_pskd_epoch_zero_is_cross_entropy_and_history_holds_last_predictions(tmp_path):
  _run(_config(num_epochs=1), tmp_path / 'pskd')
  _run(_config(baseline_config, num_epochs=1), tmp_path / 'ce')
  pskd = _records(tmp_path / 'pskd', 'train')
  ce = _records(tmp_path / 'ce', 'train')
  np.testing.assert_allclose([r['loss'] for r in pskd], [r['loss'] for r in ce], rtol=1e-6)
  np.testing.assert_allclose([r['pskd/alpha'] for r in pskd], 0.8)  # (0 + 1) / 1 epoch
  _, state = _restore(tmp_path / 'pskd')
  history = np.asarray(state['rows']['pskd'])[:NUM_EXAMPLES]
  np.testing.assert_allclose(history.sum(-1), 1.0, rtol=1e-5)
  assert np.all(history.max(-1) < 1.0)  # every example's row was overwritten by a prediction


class _Manual(NamedTuple):
  """What a test needs to drive train_step by hand on 8 devices."""

  model: Any
  method: terms_lib.Combined
  state: train.TrainState
  step: Any
  data: train.DeviceData
  order: jax.Array
  mesh: Any
  options: dict


def _manual(config) -> _Manual:
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    dataset = data_lib.load_split(config.data, 'train')
  mesh = train.make_mesh(jax.devices()[:8])
  device_data = train.to_devices(dataset, mesh)
  method = terms_lib.build(config.loss, terms_lib.Context(10, 2, 16, (32, 32, 3)))
  backbone = models.get_model('small_resnet', num_classes=10)
  model = models.WithHeads(backbone, method.heads(backbone))
  schedule = train.make_schedule(config.optim, steps_per_epoch=5, num_epochs=2)
  state = train.init_state(
      model,
      train.make_optimizer(config.optim, schedule),
      method,
      device_data,
      (32, 32, 3),
      seed=0,
      mesh=mesh,
  )
  options = dict(
      seed=0,
      batch_size=16,
      crop_padding=0,
      flip=False,
      mean=np.zeros(3, np.float32),
      std=np.ones(3, np.float32),
      dtype=jnp.float32,
  )
  step = jax.jit(
      functools.partial(
          train.train_step,
          method=method,
          mesh=mesh,
          schedule=schedule,
          steps_per_epoch=5,
          **options,
      )
  )
  order = pipeline.epoch_order(jax.random.key(0), 0, num_examples=NUM_EXAMPLES, batch_size=16)
  return _Manual(model, method, state, step, device_data, order, mesh, options)


def test_pskd_step_writes_pre_update_predictions_and_keeps_padding_rows():
  """One step by hand: the written rows are softmax of the pre-update forward pass."""
  run = _manual(_config())
  state = run.state
  for _ in range(4):  # steps 0..3: every slot real
    state, _ = run.step(state, run.order, run.data)
  before = np.asarray(state.rows['pskd'])
  params, batch_stats = state.params, state.batch_stats
  state, _ = run.step(state, run.order, run.data)  # step 4: 8 real examples + 8 padding copies
  after = np.asarray(state.rows['pskd'])
  index = np.asarray(run.order[64:80])
  x = pipeline.normalize(run.data.images[index], run.options['mean'], run.options['std'])
  (logits, _), _ = run.model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
  )
  expected = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(after[index[:8]], expected[:8], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(after[index[8:]], before[index[8:]])  # padding: not written
  untouched = np.setdiff1d(np.arange(len(after)), index[:8])
  np.testing.assert_array_equal(after[untouched], before[untouched])


def test_combined_loss_is_the_sum_of_the_weighted_terms_computed_separately():
  """PS-KD + DRG + DSR in the trainer: each term recomputed alone on the same forward pass."""
  config = _config(pskd_dsr_drg_config)
  config.loss.pskd.weight, config.loss.drg.weight, config.loss.dsr.weight = 0.7, 1.5, 2.0
  run = _manual(config)
  state = run.state
  for _ in range(7):  # into epoch 1: PS-KD's history and DSR's previous batch are in use
    state, _ = run.step(state, run.order, run.data)
  batch = train.training_batch(
      state.step,
      run.order,
      run.data,
      method=run.method,
      mesh=run.mesh,
      steps_per_epoch=5,
      **run.options,
  )
  (logits, outputs), _ = run.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats},
      batch.x,
      train=True,
      mutable=['batch_stats'],
  )
  inputs = terms_lib.TermInputs.from_forward(logits, outputs, batch.labels, state.step // 5, 1)
  _, measured = run.step(state, run.order, run.data)
  expected_total = 0.0
  for term in run.method.terms:
    rows = state.rows[term.name][batch.index] if term.name in state.rows else None
    alone = float(np.mean(term(inputs, rows, state.carry[term.name]).loss))
    assert alone > 0
    np.testing.assert_allclose(measured[f'loss/{term.name}'], alone, rtol=1e-4, atol=1e-7)
    expected_total += term.weight * alone
  np.testing.assert_allclose(measured['loss'], expected_total, rtol=1e-4)


def _count(tree):
  return sum(np.size(x) for x in jax.tree.leaves(tree))


METHODS = ['drg', 'dsr', 'lightskd', 'lsskd', 'pskd_dsr_drg']


@pytest.mark.parametrize('name', METHODS)
def test_method_trains_on_1_and_8_devices_and_exports_only_the_backbone(tmp_path, name):
  config = _config(importlib.import_module(f'configs.{name}'))
  one = _run(config, tmp_path / 'one', devices=1)
  eight = _run(config, tmp_path / 'eight', devices=8)
  assert one['steps'] == eight['steps'] == 10
  records_one, records_eight = (_records(tmp_path / d, 'train') for d in ('one', 'eight'))
  for term in config.loss:
    assert all(np.isfinite(r[f'loss/{term}']) for r in records_one)
  # The same model and loss on 1 and 8 devices: only the reduction order differs, a difference
  # that SGD then amplifies step by step.
  loss_one, loss_eight = ([r['loss'] for r in rs] for rs in (records_one, records_eight))
  np.testing.assert_allclose(loss_one[:2], loss_eight[:2], rtol=2e-4)
  np.testing.assert_allclose(loss_one, loss_eight, rtol=1e-2)
  # Heads are trained (in the checkpoint) but the evaluated and exported model is the backbone.
  backbone = models.get_model(
      'small_resnet', num_classes=10, widths=(16, 32, 64), strides=(2, 2, 2)
  )
  variables = jax.eval_shape(
      functools.partial(backbone.init, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  _, state = _restore(tmp_path / 'eight')
  heads = {'drg'} & set(config.loss) | (
      {'lsskd1', 'lsskd2', 'lsskd3'} if 'lsskd' in config.loss else set()
  )
  assert set(state['params']) == {'backbone'} | heads
  assert _count(state['params']['backbone']) == _count(variables['params'])
  exported = ocp.StandardCheckpointer().restore(tmp_path / 'eight' / 'model')
  assert set(exported) == {'params', 'batch_stats'}
  assert _count(exported['params']) == _count(variables['params'])
  assert jax.tree.structure(exported['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_resume_after_preemption_is_bit_identical(tmp_path, monkeypatch):
  """With every kind of state: PS-KD's rows, DSR's carry and DRG's head."""
  config = _config(pskd_dsr_drg_config)
  full = _run(config, tmp_path / 'full')
  real_reached = train.StopRequest.reached
  monkeypatch.setattr(train.StopRequest, 'reached', lambda self, step: step == 7)
  with pytest.raises(train.Preempted, match='step 7'):
    _run(config, tmp_path / 'resumed')
  assert _restore(tmp_path / 'resumed')[0] == 7
  assert not os.path.exists(tmp_path / 'resumed' / 'summary.json')
  with pytest.raises(train.Preempted, match='step 7'):  # again, before the first step
    _run(config, tmp_path / 'resumed')
  monkeypatch.setattr(train.StopRequest, 'reached', real_reached)
  resumed = _run(config, tmp_path / 'resumed')
  assert {k: v for k, v in resumed.items() if k != 'train_seconds'} == {
      k: v for k, v in full.items() if k != 'train_seconds'
  }
  _, state_full = _restore(tmp_path / 'full')
  _, state_resumed = _restore(tmp_path / 'resumed')
  jax.tree.map(np.testing.assert_array_equal, state_full, state_resumed)
  assert state_full['carry']['dsr']['has_previous'] and 'drg' in state_full['params']
  # The metrics file reads as one run: each step logged once.
  steps = [r['step'] for r in _records(tmp_path / 'resumed', 'train')]
  assert steps == sorted(set(steps)) == [r['step'] for r in _records(tmp_path / 'full', 'train')]


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch
):
  @dataclasses.dataclass(frozen=True)
  class NaNFromEpochOne(terms_lib.LossTerm):
    weight: float = 1.0
    name: str = 'nan_term'

    def __call__(self, inputs, rows=None, carry=None):
      ce = losses.soft_target_cross_entropy(inputs.logits, inputs.one_hot)
      return terms_lib.TermOutput(jnp.where(inputs.epoch >= 1, jnp.nan, ce))

  module = types.SimpleNamespace(make=lambda settings, context: NaNFromEpochOne())
  monkeypatch.setitem(sys.modules, 'skd_jax.terms.nan_term', module)
  config = _config(baseline_config)
  config.loss = {'nan_term': {'weight': 1.0}}
  with pytest.raises(FloatingPointError, match='at step 6'):
    _run(config, tmp_path)
  step, state = _restore(tmp_path)
  assert step == 5
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))
  assert not os.path.exists(tmp_path / 'summary.json')


def test_invalid_alpha_fails_before_writing_anything(tmp_path):
  config = _config()
  config.loss.pskd.alpha_T = 1.5
  with pytest.raises(ConfigError, match=r'loss.pskd.alpha_T: expected a number in \[0, 1\]'):
    _run(config, tmp_path / 'wd')
  assert not os.path.exists(tmp_path / 'wd')
