"""The trainer end to end on mocked TFDS data: devices, PS-KD state, resume, failures."""

import functools
import importlib
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
import skd_jax
from skd_jax import data as data_lib
from skd_jax import models
from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax import train_log
from skd_jax.errors import ConfigError

pytestmark = pytest.mark.slow

NUM_EXAMPLES = runs.NUM_EXAMPLES
_config, _records, _restore = runs.config, runs.records, runs.restore


def _run(config, workdir, devices=8):
  return runs.run(config, workdir, devices)


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
  _run(_config('baseline', num_epochs=1), tmp_path / 'ce')
  pskd = _records(tmp_path / 'pskd', 'train')
  ce = _records(tmp_path / 'ce', 'train')
  np.testing.assert_allclose([r['loss'] for r in pskd], [r['loss'] for r in ce], rtol=1e-6)
  np.testing.assert_allclose([r['pskd/alpha'] for r in pskd], 0.8)  # (0 + 1) / 1 epoch
  _, state = _restore(tmp_path / 'pskd')
  history = np.asarray(state['rows']['pskd'])[:NUM_EXAMPLES]
  np.testing.assert_allclose(history.sum(-1), 1.0, rtol=1e-5)
  assert np.all(history.max(-1) < 1.0)  # every example's row was overwritten by a prediction


def _manual(config) -> train.Job:
  """The compiled job on 8 devices, to drive steps by hand (its step donates the state)."""
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.build_job(config, jax.devices()[:8])


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _batch(job, step):
  """Step ``step``'s batch as the compiled step sees it."""
  return job.source.batch(jnp.int32(step), *job.source.step_args(step))


def test_a_non_finite_batchnorm_statistic_is_reported_and_stops_the_run():
  """A running variance can go bad while the loss and the gradient stay finite (eval-mode only)."""
  job = _manual(_config())
  state, measured = job.step(job.state, 0)
  assert bool(measured['finite'])
  stats = _copy(state.batch_stats)
  var = stats['backbone']['stem_bn']['var']
  stats['backbone']['stem_bn']['var'] = var.at[0].set(jnp.inf)
  state, measured = job.step(state.replace(batch_stats=stats), 1)
  assert np.isfinite(measured['loss']) and np.isfinite(measured['grad_norm'])
  assert not bool(measured['finite'])
  window = train_log.Window()
  window.add(2, measured)
  with pytest.raises(
      FloatingPointError, match='non-finite parameters or BatchNorm statistics at ' 'step 2'
  ):
    window.take()


def test_pskd_step_writes_pre_update_predictions_and_keeps_padding_rows():
  """One step by hand: the written rows are softmax of the pre-update forward pass."""
  job = _manual(_config())
  state = job.state
  for step in range(4):  # steps 0..3: every slot real
    state, _ = job.step(state, step)
  before = np.asarray(state.rows['pskd'])
  params, batch_stats = _copy(state.params), _copy(state.batch_stats)
  state, _ = job.step(state, 4)  # step 4: 8 real examples + 8 padding copies
  after = np.asarray(state.rows['pskd'])
  main = _batch(job, 4)['main']
  index = np.asarray(main.index)
  assert list(np.asarray(main.valid)) == [True] * 8 + [False] * 8
  logits, _, _ = job.networks.apply_student(params, batch_stats, main.images)
  expected = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(after[index[:8]], expected[:8], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(after[index[8:]], before[index[8:]])  # padding: not written
  untouched = np.setdiff1d(np.arange(len(after)), index[:8])
  np.testing.assert_array_equal(after[untouched], before[untouched])


def test_combined_loss_is_the_sum_of_the_weighted_terms_computed_separately():
  """PS-KD + DRG + DSR in the trainer: each term recomputed alone on the same forward pass."""
  config = _config('pskd_dsr_drg')
  config.loss.pskd.weight, config.loss.drg.weight, config.loss.dsr.weight = 0.7, 1.5, 2.0
  job = _manual(config)
  state = job.state
  for step in range(7):  # into epoch 1: PS-KD's history and DSR's previous batch are in use
    state, _ = job.step(state, step)
  main = _batch(job, 7)['main']
  logits, outputs, _ = job.networks.apply_student(state.params, state.batch_stats, main.images)
  inputs = terms_lib.TermInputs.from_forward(logits, outputs, main.labels, 7 // 5, 1)
  method = terms_lib.build(config.loss, terms_lib.Context(10, 2, 16, (32, 32, 3), 3))
  expected = {
      term.name: float(
          np.mean(
              term(
                  inputs,
                  state.rows[term.name][main.index] if term.name in state.rows else None,
                  state.carry[term.name],
              ).loss
          )
      )
      for term in method.terms
  }
  _, measured = job.step(state, 7)
  expected_total = 0.0
  for term in method.terms:
    assert expected[term.name] > 0
    np.testing.assert_allclose(
        measured[f'loss/{term.name}'], expected[term.name], rtol=1e-4, atol=1e-7
    )
    expected_total += term.weight * expected[term.name]
  np.testing.assert_allclose(measured['loss'], expected_total, rtol=1e-4)


def _count(tree):
  return sum(np.size(x) for x in jax.tree.leaves(tree))


# pskd_dsr_drg covers drg, dsr and lightskd (drg + dsr); tests/test_methods.py the later methods.
METHODS = ['lsskd', 'pskd_dsr_drg']


@pytest.mark.parametrize('name', METHODS)
def test_method_trains_on_1_and_8_devices_and_exports_only_the_backbone(tmp_path, name):
  config = _config(name)
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
  exported = skd_jax.load_model(tmp_path / 'eight').variables
  assert set(exported) == {'params', 'batch_stats'}
  assert _count(exported['params']) == _count(variables['params'])
  assert jax.tree.structure(exported['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_invalid_alpha_fails_before_writing_anything(tmp_path):
  config = _config()
  config.loss.pskd.alpha_T = 1.5
  with pytest.raises(ConfigError, match=r'loss.pskd.alpha_T: expected a number in \[0, 1\]'):
    _run(config, tmp_path / 'wd')
  assert not os.path.exists(tmp_path / 'wd')


def test_the_exported_model_loads_in_one_call_and_reproduces_the_summarys_top1(
    tmp_path, monkeypatch
):
  summary = _run(_config('pskd_dsr_drg'), tmp_path / 'wd')  # with a training-only head
  monkeypatch.chdir(tmp_path)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    test = data_lib.load_split(_config().data, 'test')
  for path in ('wd', 'wd/model', tmp_path / 'wd'):  # relative or absolute, workdir or model/
    model = skd_jax.load_model(path)
    logits = model(test.images)
    assert logits.dtype == jnp.float32 and logits.shape == (NUM_EXAMPLES, 10)
    # In float64, as the summary: a float32 mean misses 100 * 8 / 72 in the last digits.
    correct = np.argmax(np.asarray(logits), -1) == test.labels
    assert float(100.0 * np.mean(correct)) == summary['top1']
  assert model.spec.options == {'dtype': 'float32', 'widths': (16, 32, 64), 'strides': (2, 2, 2)}
  with open(tmp_path / 'wd' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  # Units and numbering shared by both kinds of record: accuracies in %, epoch = step / 5.
  for r in records:
    assert r['epoch'] == round(r['step'] / runs.STEPS_PER_EPOCH, 4) and 0 <= r['top1'] <= 100
  assert [r['step'] for r in records if r['kind'] == 'train'] == [2, 4, 6, 8, 10]
  assert [(r['step'], r['epoch']) for r in records if r['kind'] == 'eval'] == [(5, 1.0), (10, 2.0)]
  assert set(next(r for r in records if r['kind'] == 'train')) == {
      'kind',
      'step',
      'epoch',
      'loss',
      'loss/dsr',
      'loss/drg',
      'loss/pskd',
      'top1',
      'lr',
      'grad_norm',
      'pskd/alpha',
      'drg/top1',
  }


def test_the_readmes_load_model_example_reproduces_the_summarys_top1(tmp_path, monkeypatch):
  """The README's "Using a trained model" block, run on a small real idx run."""
  fashion = runs.fashion_mnist(tmp_path, 64, 48)
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.data.dir, config.num_epochs, config.batch_size = fashion, 1, 16
  summary = train.train_and_evaluate(config, str(tmp_path / 'wd'), devices=jax.devices()[:1])
  with open(os.path.join(os.path.dirname(__file__), '..', 'README.md')) as f:
    readme = f.read()
  block = re.findall(
      r'```python\n(.*?)```', readme[readme.index('## Using a trained model') :], re.S
  )[0]
  block = block.replace("'workdirs/pskd_quick'", repr(str(tmp_path / 'wd')))
  monkeypatch.setattr(data_lib, 'FASHION_MNIST_DIR', fashion)
  printed = []
  exec(compile(block, 'README.md', 'exec'), {'print': printed.append})  # pylint: disable=exec-used
  assert printed == [f'test top-1 {summary["top1"]:.2f}%']
