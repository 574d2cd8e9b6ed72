"""CS-KD, DLB, SD-Dropout, Beta smoothing, teacher KD, born-again generations and the terms added
since (TF-KD reg, Zipf's LS, USKD, BAKE, BYOT) in the trainer."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
import skd_jax
from skd_jax import generations
from skd_jax import networks as networks_lib
from skd_jax import preemption
from skd_jax import train
from skd_jax.errors import ConfigError

pytestmark = pytest.mark.slow


def _records(workdir, kind='train'):
  return runs.records(workdir, kind)


def _all_new_state():
  """PS-KD rows (top-k: a pytree of int16 and bfloat16 tables), a DLB carry sharded with the
  batch, a DSR carry replicated, CS-KD partners, an EMA copy, and randomness inside the loss
  (SD-Dropout masks, Beta draws). tests/test_faults.py resumes float32 PS-KD rows."""
  config = runs.config('pskd_dlb')
  config.loss.pskd.storage = 'top_k'
  config.loss.pskd.top_k = 3
  config.loss.dsr = dict(weight=1.0, temperature=4.0)
  config.loss.cskd = dict(weight=1.0, temperature=4.0)
  config.loss.sd_dropout = dict(weight=0.1)
  config.loss.beta_smoothing = dict(weight=0.5)
  return config


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  return runs.untrained_teacher(tmp_path_factory.mktemp('teacher'))


def _label_and_batch_terms(teacher_workdir):
  """The terms added with the import-path protocol, all at once: a virtual teacher (TF-KD reg),
  votes of the classifier over the feature map (Zipf's LS), a linear weak head (USKD, groups of 4
  that span devices), ensembles over the whole batch (BAKE), classifiers on the shallow stages
  (BYOT, and DKS's beside them), a self-teacher over several stages (FRSKD), a second draw of
  the augmentation (DDGSD's 'again' group), images mixed across the batch with their own
  branches and self-teacher (MixSKD) and a discriminator on term-owned parameters with its own
  optimizer against a frozen teacher (AI-KD), beside the cross-entropy."""
  config = runs.config('byot')
  config.loss.tfkd_reg = dict(weight=0.1)
  config.loss.zipf_ls = dict(weight=0.1)
  config.loss.uskd = dict(weight=1.0, group_size=4)
  config.loss.bake = dict(weight=0.5)
  config.loss.dks = dict(weight=0.5)
  config.loss.frskd = dict(weight=0.5, width=1, depth=1)
  config.loss.ddgsd = dict(weight=0.5)
  config.loss.mixskd = dict(weight=0.5)
  config.teacher.workdir = teacher_workdir
  config.loss.aikd = dict(weight=0.1, hidden=(16,), learning_rate=1e-3)
  return config


@pytest.mark.parametrize('name', ['all_new_state', 'label_and_batch_terms', 'cskd_lsskd'])
def test_methods_train_on_1_and_8_devices_with_the_same_losses(tmp_path, teacher, name):
  """Every kind of state at once, every term added since, and partners with rotated views."""
  if name == 'all_new_state':
    config = _all_new_state()
  elif name == 'label_and_batch_terms':
    config = _label_and_batch_terms(teacher)
  else:
    config = runs.config(name)
  config.num_epochs = 1
  runs.run(config, tmp_path / 'one', devices=1)
  runs.run(config, tmp_path / 'eight', devices=8)
  one, eight = _records(tmp_path / 'one'), _records(tmp_path / 'eight')
  for term in config.loss:
    assert all(np.isfinite(r[f'loss/{term}']) for r in one + eight)
  # Samplers, dropout masks and Beta draws depend on (seed, step), not on the device count.
  np.testing.assert_allclose(one[0]['loss'], eight[0]['loss'], rtol=2e-4)
  np.testing.assert_allclose([r['loss'] for r in one], [r['loss'] for r in eight], rtol=1e-2)


def test_the_terms_added_since_resume_bit_identically_after_a_preemption(
    tmp_path, teacher, monkeypatch
):
  runs.run(_label_and_batch_terms(teacher), tmp_path / 'straight')
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)
    with pytest.raises(train.Preempted, match='at step 7'):
      runs.run(_label_and_batch_terms(teacher), tmp_path / 'resumed')
  runs.run(_label_and_batch_terms(teacher), tmp_path / 'resumed')
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 10)
  _, expected = runs.restore(tmp_path / 'straight', 10)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  records = runs.records(tmp_path / 'resumed', 'train')
  terms = ('byot', 'tfkd_reg', 'zipf_ls', 'uskd', 'bake', 'dks', 'frskd', 'ddgsd', 'mixskd', 'aikd')
  for term in terms:
    assert all(np.isfinite(r[f'loss/{term}']) for r in records), term
  assert all(np.isfinite(r['objective/aikd']) for r in records)
  # The discriminator and its Adam state were checkpointed and resumed with the rest.
  assert set(state['term_params']) == set(state['term_opt_state']) == {'aikd'}


def test_a_preempted_run_with_every_kind_of_state_resumes_bit_identically(tmp_path, monkeypatch):
  runs.run(_all_new_state(), tmp_path / 'straight')
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)  # mid-epoch, mid-window
    with pytest.raises(train.Preempted, match='at step 7'):
      runs.run(_all_new_state(), tmp_path / 'resumed')
  runs.run(_all_new_state(), tmp_path / 'resumed')
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 10)
  _, expected = runs.restore(tmp_path / 'straight', 10)
  assert set(state['carry']) == {'beta_smoothing', 'cskd', 'dlb', 'dsr', 'pskd', 'sd_dropout'}
  assert state['ema']
  # The checkpoint holds the compact history: (padded) examples x k.
  rows = state['rows']['pskd']
  assert rows['indices'].dtype == np.int16 and rows['values'].dtype == jnp.bfloat16
  assert rows['indices'].shape == rows['values'].shape == (runs.NUM_EXAMPLES, 3)
  jax.tree.map(np.testing.assert_array_equal, state, expected)


def test_zero_weights_train_as_the_cross_entropy_baseline():
  """Extra passes, groups, keys and the EMA copy change nothing while their terms weigh 0.

  Exactly so on plain arrays (tests/test_peer_methods.py). In the compiled step XLA fuses the
  extra passes with the main one, which can change the last bit of a float32 reduction; over a
  few steps the parameters then stay within a few ulps (SGD amplifies such differences later).
  """
  zero = runs.config('baseline')
  for name in ('cskd', 'dlb', 'sd_dropout', 'beta_smoothing'):
    zero.loss[name] = dict(weight=0.0)
  with tfds.testing.mock_data(num_examples=runs.NUM_EXAMPLES):
    jobs = [train.build_job(c, jax.devices()[:8]) for c in (runs.config('baseline'), zero)]
  states = [job.state for job in jobs]
  for step in range(5):
    (states[0], baseline), (states[1], measured) = (
        job.step(state, step) for job, state in zip(jobs, states)
    )
    if step == 0:
      assert float(measured['loss']) == float(baseline['loss'])
      assert float(measured['grad_norm']) == float(baseline['grad_norm'])
    np.testing.assert_allclose(measured['loss'], baseline['loss'], rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-7),
        states[1].params['backbone'],
        states[0].params['backbone'],
    )


def test_beta_smoothing_evaluates_its_ema_copy_beside_the_student(tmp_path):
  summary = runs.run(runs.config('beta_smoothing'), tmp_path)
  for record in _records(tmp_path, 'eval'):
    assert {'top1', 'ema/top1', 'ema/nll', 'ema/ece'} <= set(record)
  assert {'ema/top1', 'ema/ece'} <= set(summary) and summary['ema/top1'] >= 0
  _, state = runs.restore(tmp_path)
  ema, student = state['ema'], state['params']['backbone']
  assert jax.tree.structure(ema['params']) == jax.tree.structure(student)
  assert not np.array_equal(ema['params']['head']['kernel'], student['head']['kernel'])
  # The export is the student's backbone, not the EMA copy.
  exported = skd_jax.load_model(tmp_path).variables['params']
  np.testing.assert_array_equal(exported['head']['kernel'], student['head']['kernel'])


def _digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def test_a_frozen_teacher_of_another_architecture_teaches_and_stays_out_of_the_state(tmp_path):
  teacher = runs.config('baseline', num_epochs=1)
  teacher.model.widths = (8, 16, 32)  # any architecture
  runs.run(teacher, tmp_path / 'teacher')
  before = _digest(tmp_path / 'teacher')
  config = runs.config('teacher_kd')
  config.teacher.workdir = str(tmp_path / 'teacher')
  runs.run(config, tmp_path / 'student')
  assert _digest(tmp_path / 'teacher') == before
  assert all(r['loss/teacher_kd'] > 0 for r in _records(tmp_path / 'student'))
  _, state = runs.restore(tmp_path / 'student')
  student_leaves = len(jax.tree.leaves(state['params']))
  backbone = skd_jax.load_model(tmp_path / 'student').variables
  assert student_leaves == len(jax.tree.leaves(backbone['params']))  # no teacher parameters
  assert state['ema'] == {} and state['params']['backbone']['stem_conv']['kernel'].shape[-1] == 16


def test_the_teacher_pass_has_no_gradient(tmp_path):
  teacher = runs.config('baseline', num_epochs=1)
  runs.run(teacher, tmp_path / 'teacher')
  model = skd_jax.load_model(tmp_path / 'teacher')
  networks = networks_lib.Networks(model.spec, {}, teacher=model)
  images = np.random.default_rng(0).integers(0, 256, (4, *model.input_shape)).astype(np.uint8)
  grads = jax.grad(lambda v: networks.apply_teacher(v, images)[0].sum())(model.variables)
  assert all(not np.any(g) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize(
    'workdir, loss, message',
    [
        (
            '',
            'teacher_kd',
            "teacher.workdir: a loss term needs a teacher; expected an earlier run's",
        ),
        ('missing', 'teacher_kd', 'teacher.workdir: .*missing: no exported model'),
        ('missing', 'baseline', 'teacher.workdir: set, but no loss term uses a teacher'),
    ],
)
def test_a_bad_teacher_is_a_config_error_before_anything_is_written(
    tmp_path, workdir, loss, message
):
  config = runs.config(loss)
  config.teacher.workdir = str(tmp_path / workdir) if workdir else ''
  with pytest.raises(ConfigError, match=message):
    runs.run(config, tmp_path / 'wd')
  assert not os.path.exists(tmp_path / 'wd')


def test_born_again_generations_train_in_sequence_and_resume_where_they_stopped(
    tmp_path, monkeypatch
):
  config = runs.config('teacher_kd', num_epochs=1)
  workdir = str(tmp_path / 'ban')
  first = os.path.join(workdir, 'generation1')
  devices = jax.devices()[:8]
  with tfds.testing.mock_data(num_examples=runs.NUM_EXAMPLES):
    generations.train_generations(config, workdir, 1, devices)
    with open(os.path.join(first, 'config.json')) as f:
      assert set(json.load(f)['loss']) == {'cross_entropy'}  # generation 1: no teacher
    finished = os.path.getmtime(os.path.join(first, 'summary.json'))
    with monkeypatch.context() as patch:  # stopped during generation 2
      patch.setattr(preemption, 'reached', lambda step: step == 3)
      with pytest.raises(train.Preempted, match='at step 3'):
        generations.train_generations(config, workdir, 2, devices)
    summaries = generations.train_generations(config, workdir, 2, devices)
  assert os.path.getmtime(os.path.join(first, 'summary.json')) == finished  # skipped
  second = os.path.join(workdir, 'generation2')
  with open(os.path.join(second, 'config.json')) as f:
    assert json.load(f)['teacher']['workdir'] == first
  assert len(summaries) == 2 and summaries[1]['steps'] == runs.STEPS_PER_EPOCH
  assert [r['step'] for r in _records(second)] == [2, 4, 5]  # one run's records, resumed at 3
  # A finished generation is compared with the command as a resume would be, before anything.
  finished = {
      g: os.path.getmtime(os.path.join(workdir, g, 'summary.json'))
      for g in ('generation1', 'generation2')
  }
  changed_seed = runs.config('teacher_kd', num_epochs=1, seed=7)
  with pytest.raises(
      ConfigError, match=r'^--generations: generation 1: .*different config: seed \(0 -> 7\)'
  ):
    generations.train_generations(changed_seed, workdir, 3, devices)
  changed_loss = runs.config('teacher_kd', num_epochs=1)
  changed_loss.loss.teacher_kd.temperature = 2.0  # unused by generation 1
  with pytest.raises(
      ConfigError, match=r'^--generations: generation 2: .*loss.teacher_kd.temperature'
  ):
    generations.train_generations(changed_loss, workdir, 3, devices)
  changed_lr = runs.config('teacher_kd', num_epochs=1)
  changed_lr.optim.lr /= 2  # resumable: applies from the next generation trained
  assert generations.train_generations(changed_lr, workdir, 2, devices) == summaries
  assert not os.path.exists(os.path.join(workdir, 'generation3'))
  assert finished == {
      g: os.path.getmtime(os.path.join(workdir, g, 'summary.json')) for g in finished
  }


def test_generations_need_a_teacher_term():
  with pytest.raises(ConfigError, match='--generations: the config has no loss term that uses'):
    generations.train_generations(runs.config('baseline'), '/nonexistent', 2)
