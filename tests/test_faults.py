"""Faults made to happen in the real trainer: kills, torn files, corrupt checkpoints, divergence.

Every interrupted run below is finished by rerunning it, and must then equal one uninterrupted run
(the same model bit for bit, the same metrics.jsonl apart from wall-clock seconds).
"""

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
from skd_jax import checkpoints as checkpoints_lib
from skd_jax import events
from skd_jax import losses
from skd_jax import optim
from skd_jax import preemption
from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError

pytestmark = pytest.mark.slow

CONFIG = 'pskd_dsr_drg'  # every kind of state: PS-KD rows, DSR carry, DRG head


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  summary = runs.run(runs.config(CONFIG), workdir)
  return workdir, summary


def _assert_same_run(workdir, uninterrupted):
  expected_dir, expected_summary = uninterrupted
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert {k: v for k, v in summary.items() if k != 'train_seconds'} == {
      k: v for k, v in expected_summary.items() if k != 'train_seconds'
  }
  assert runs.without_time(runs.records(workdir)) == runs.without_time(runs.records(expected_dir))
  # TensorBoard shows each step once, with the values of metrics.jsonl.
  assert events.read(os.path.join(workdir, 'tensorboard')) == runs.event_scalars(
      runs.records(workdir)
  )
  _, state = runs.restore(workdir, 10)
  _, expected = runs.restore(expected_dir, 10)
  jax.tree.map(np.testing.assert_array_equal, state, expected)


class Killed(BaseException):
  """Stands in for SIGKILL: nothing in the trainer catches it."""


def _kill_at_first_save(monkeypatch):
  def save(self, step, state, meta):
    raise Killed(step)

  monkeypatch.setattr(checkpoints_lib.Checkpoints, 'save', save)


def _kill_after_record(step):
  def install(monkeypatch):
    real_log = workdir_lib.Workdir.log

    def log(self, record):
      real_log(self, record)
      if record['step'] == step:
        raise Killed(step)

    monkeypatch.setattr(workdir_lib.Workdir, 'log', log)

  return install


def _preempt_at(step):
  def install(monkeypatch):
    monkeypatch.setattr(preemption, 'reached', lambda s: s == step)

  return install


@pytest.mark.parametrize(
    'fault, interruption',
    [
        (_kill_at_first_save, Killed),  # nothing committed: the rerun starts from scratch
        (_kill_after_record(8), Killed),  # records past the checkpoint at step 5
        (_preempt_at(7), train.Preempted),  # saved mid-window: step 7's measurements pending
    ],
    ids=['killed_before_first_save', 'killed_after_a_checkpoint', 'preempted_mid_window'],
)
def test_an_interrupted_run_finishes_as_one_uninterrupted_run(
    tmp_path, monkeypatch, uninterrupted, fault, interruption
):
  with monkeypatch.context() as patch:
    fault(patch)
    with pytest.raises(interruption):
      runs.run(runs.config(CONFIG), tmp_path)
  if interruption is train.Preempted:  # a second signal, before the resumed run's first step
    saved = sorted(os.listdir(tmp_path / 'checkpoints'))
    with monkeypatch.context() as patch:
      patch.setattr(preemption, 'reached', lambda step: True)
      with pytest.raises(train.Preempted, match='at step 7'):
        runs.run(runs.config(CONFIG), tmp_path)
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == saved  # nothing new to save
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"kind": "train", "step": 9, "lo')  # the line a killed process was writing
  runs.run(runs.config(CONFIG), tmp_path)
  _assert_same_run(tmp_path, uninterrupted)


def _largest_data_file(checkpoint):
  files = [os.path.join(d, f) for d, _, fs in os.walk(checkpoint) for f in fs]
  return max(files, key=os.path.getsize)


def _flip_bytes(checkpoint):
  path = _largest_data_file(checkpoint)
  with open(path, 'r+b') as f:
    data = bytearray(f.read())
    middle = len(data) // 2
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    f.seek(0)
    f.write(data)


def _truncate(checkpoint):
  path = _largest_data_file(checkpoint)
  os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(checkpoint):
  os.remove(os.path.join(checkpoint, 'state', '_METADATA'))


@pytest.mark.parametrize('corrupt', [_flip_bytes, _truncate, _delete_metadata])
def test_a_broken_latest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(
    tmp_path, caplog, uninterrupted, corrupt
):
  workdir = tmp_path / 'wd'
  shutil.copytree(uninterrupted[0], workdir)
  corrupt(str(workdir / 'checkpoints' / '10'))
  with caplog.at_level(logging.WARNING, logger='skd_jax'):
    runs.run(runs.config(CONFIG), workdir)
  skipped = [r.getMessage() for r in caplog.records if 'Skipped the checkpoint' in r.getMessage()]
  assert len(skipped) == 1 and skipped[0].startswith('Skipped the checkpoint at step 10: it ')
  assert '\n' not in skipped[0]
  assert sorted(os.listdir(workdir / 'broken_checkpoints')) == ['10']  # kept for inspection
  _assert_same_run(workdir, uninterrupted)


def test_with_every_checkpoint_broken_the_run_starts_over(tmp_path, caplog, uninterrupted):
  workdir = tmp_path / 'wd'
  shutil.copytree(uninterrupted[0], workdir)
  _flip_bytes(str(workdir / 'checkpoints' / '10'))
  _delete_metadata(str(workdir / 'checkpoints' / '5'))
  with caplog.at_level(logging.WARNING, logger='skd_jax'):
    runs.run(runs.config(CONFIG), workdir)
  assert sum('Skipped the checkpoint' in r.getMessage() for r in caplog.records) == 2
  assert sorted(os.listdir(workdir / 'broken_checkpoints')) == ['10', '5']
  _assert_same_run(workdir, uninterrupted)


def test_a_non_finite_state_is_never_saved(tmp_path):
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path / 'c'), str(tmp_path / 'b'), keep=2)
  with pytest.raises(FloatingPointError, match=r'non-finite values in w at step 3'):
    checkpoints.save(3, {'w': jnp.array([1.0, jnp.nan]), 'n': jnp.arange(2)}, {})
  checkpoints.close()
  assert os.listdir(tmp_path / 'c') == []


def test_a_checkpoint_that_does_not_fit_is_refused_and_kept_and_a_damaged_one_moved_aside(tmp_path):
  """A history of another size is no damage: before, it sent the intact checkpoint aside."""
  state = {'params': jnp.ones((3, 4)), 'rows': {'pskd': jnp.zeros((40, 10), jnp.bfloat16)}}
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path / 'c'), str(tmp_path / 'b'), keep=2)
  checkpoints.save(5, state, {})
  checkpoints.close()
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path / 'c'), str(tmp_path / 'b'), keep=2)
  misfits = [
      (
          {**state, 'rows': {'pskd': jnp.zeros((36, 10), jnp.bfloat16)}},
          r'rows/pskd is bfloat16\[40, 10\] there and bfloat16\[36, 10\] here',
      ),
      (
          {**state, 'rows': {'pskd': jnp.zeros((40, 10))}},
          r'rows/pskd is bfloat16\[40, 10\] there and float32\[40, 10\] here',
      ),
      ({**state, 'carry': {'dsr': jnp.zeros(2)}}, r'it lacks carry/dsr \(float32\[2\] here\)'),
      # a term without state: no array more, but another tree (orbax would not restore it)
      ({**state, 'carry': {'cross_entropy': None}}, r'it lacks carry/cross_entropy \(empty here\)'),
      ({'params': state['params']}, 'it holds rows/pskd, which this run has not'),
  ]
  for abstract_state, misfit in misfits:
    with pytest.raises(
        ConfigError, match=f'^checkpoint: {tmp_path}/c/5 does not fit this run: {misfit}; it was '
    ):
      checkpoints.restore(train.abstract(abstract_state))
  assert os.listdir(tmp_path / 'c') == ['5'] and not os.path.exists(tmp_path / 'b')
  assert checkpoints.restore(train.abstract(state))[0] == 5
  _flip_bytes(str(tmp_path / 'c' / '5'))
  assert checkpoints.restore(train.abstract(state)) is None
  checkpoints.close()
  assert os.listdir(tmp_path / 'c') == [] and os.listdir(tmp_path / 'b') == ['5']


def _with_cross_entropy(config):
  config.loss.cross_entropy = {'weight': 1.0}  # a term without state, at its default settings
  return config


def test_a_term_added_on_resume_is_refused_and_nothing_is_written(tmp_path, uninterrupted):
  """Before, a term the run lacks at its default settings was taken for a key of a newer skd_jax:
  the intact checkpoints were moved aside and the run started over with the new loss."""
  workdir = tmp_path / 'wd'
  shutil.copytree(uninterrupted[0], workdir)
  (workdir / 'summary.json').unlink()  # as if stopped after its last checkpoint
  before = {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  with pytest.raises(
      ConfigError,
      match=r'^workdir: \S+ holds a run with a different config: loss.cross_entropy.weight '
      r'\(None -> 1.0\); only ',
  ) as refused:
    runs.run(_with_cross_entropy(runs.config(CONFIG)), workdir)
  assert '\n' not in str(refused.value)
  after = {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  assert after == before


def test_a_checkpoint_of_another_tree_does_not_fit_and_stays(tmp_path, uninterrupted):
  """A term without state adds no array, only an empty node: before, orbax's refusal of the tree
  counted as damage and the intact checkpoints were moved to broken_checkpoints/."""
  workdir = tmp_path / 'wd'
  shutil.copytree(uninterrupted[0], workdir)
  saved = sorted(os.listdir(workdir / 'checkpoints'))
  # A config.json that lets the run reach the checkpoints (as if the term had been in it).
  config = json.loads((workdir / 'config.json').read_text())
  config['loss']['cross_entropy'] = {'weight': 1.0}
  (workdir / 'config.json').write_text(json.dumps(config))
  with pytest.raises(
      ConfigError,
      match=r'^checkpoint: \S+/checkpoints/10 does not fit this run: it lacks '
      r'carry/cross_entropy \(empty here\); ',
  ):
    runs.run(_with_cross_entropy(runs.config(CONFIG)), workdir)
  assert sorted(os.listdir(workdir / 'checkpoints')) == saved
  assert not (workdir / 'broken_checkpoints').exists()


@pytest.mark.parametrize(
    'message',
    [
        # a chunk's write, as orbax 0.12.8 reports it (the OS's words just before the code)
        'OUT_OF_RANGE: Error writing "a/0" in OCDBT database at local file "/c/1.tmp/": Failed '
        'writing: "/c/1.tmp/d/be64": Failed to write 1008207 bytes to file 4: File too large '
        "[os_error_code='27']",
        # another write puts a JSON spec between the words and the code (seen in CI)
        'INTERNAL: Error writing local file "/c/1.tmp/_METADATA": write failed [tensorstore_spec='
        '\'{"driver":"json","kvstore":{"driver":"file"},"recheck_cached_data":true}\'] '
        '[os_error_code=27]',
    ],
)
def test_a_failed_write_is_named_by_its_os_error_code_wherever_it_stands(message):
  assert checkpoints_lib._cause(ValueError(message)) == 'File too large (errno 27)'


def _raised(make):
  try:
    make()
  except Exception as e:  # pylint: disable=broad-except
    return e


def _wrapped_read():
  try:
    raise ValueError('OUT_OF_RANGE: Error reading "w/0": Requested byte range [0, 9) is not valid')
  except BaseException as e:
    raise Exception('Encountered error while reading array index. TensorStore({\n...') from e


def test_a_failed_read_is_named_by_the_innermost_error_a_traceback_would_show():
  """Not orbax's wrapper with a tensorstore spec, not the '0' of a JSON decoder's internals."""
  assert checkpoints_lib.read_error(_raised(_wrapped_read)).startswith('OUT_OF_RANGE: Error rea')
  assert checkpoints_lib.read_error(_raised(lambda: json.loads(''))) == (
      'Expecting value: line 1 column 1 (char 0)'
  )


def _every_single_bit_flip(x):
  """``x`` once per bit of its elements with that bit flipped: ``[x.size * bits, *x.shape]``."""
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
  bits = np.asarray(x).view(unsigned).reshape(-1)
  width = 8 * x.dtype.itemsize
  flips = np.repeat(bits[None], bits.size * width, axis=0)
  for n in range(bits.size * width):
    flips[n, n // width] ^= unsigned(1) << unsigned(n % width)
  return jnp.asarray(flips.view(x.dtype).reshape(-1, *x.shape))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16, jnp.int8])
def test_the_fingerprint_sees_every_single_bit_flip_and_swapped_elements(dtype):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 13)) * 50).astype(dtype)
  record, non_finite = checkpoints_lib.fingerprint({'x': x, 'k': jax.random.key(0)})
  assert set(record['checksums']) == {'x', 'k'} and non_finite == []
  checksum = functools.partial(
      checkpoints_lib._checksum, version=checkpoints_lib.FINGERPRINT_VERSION
  )
  flipped = np.asarray(jax.vmap(checksum)(_every_single_bit_flip(x)))
  assert (flipped != record['checksums']['x']).all()  # every bit of every element, sign included
  assert int(checksum(x[::-1])) != record['checksums']['x']


def test_version_1_fingerprints_still_verify_and_missed_a_sign_bit_at_odd_positions():
  x = jnp.linspace(-1, 1, 12, dtype=jnp.float32).reshape(3, 4)
  record = {'version': 1, 'checksums': {'x': int(checkpoints_lib._checksum(x, 1))}}
  sign_flipped = x.at[0, 1].multiply(-1)  # element 1: an even weight in version 1
  assert checkpoints_lib.verify({'x': x}, record) is None
  assert checkpoints_lib.verify({'x': x}, record['checksums']) is None  # flat, as first written
  assert checkpoints_lib.verify({'x': sign_flipped}, record) is None  # why version 2 exists
  assert checkpoints_lib.verify({'x': sign_flipped}, checkpoints_lib.fingerprint({'x': x})[0]) == (
      'does not match its fingerprint in x'
  )
  assert checkpoints_lib.verify({'x': x}, {'version': 3, 'checksums': {}}) == (
      'has a fingerprint of version 3, which is not one this skd_jax knows'
  )
  assert checkpoints_lib.verify({'x': x}, None) == 'has no fingerprint'


def test_a_checkpoint_fingerprinted_before_versions_restores_and_is_still_checked(tmp_path):
  """Checkpoints of earlier skd_jax runs hold a flat version-1 fingerprint: they resume."""
  state = {'params': jnp.linspace(-1, 1, 12).reshape(3, 4), 'step': jnp.int32(7)}
  for checksum_of_params, restored in ((None, True), (12345, False)):
    directory = tmp_path / ('intact' if restored else 'damaged')
    checkpoints = checkpoints_lib.Checkpoints(str(directory / 'c'), str(directory / 'b'), keep=2)
    checkpoints.save(5, state, {'pending': []})
    checkpoints.finish()
    meta_file = directory / 'c' / '5' / 'meta' / 'metadata'
    meta = json.loads(meta_file.read_text())
    assert meta['fingerprint']['version'] == checkpoints_lib.FINGERPRINT_VERSION
    old = checkpoints_lib._checksums(state, 1)[0]
    meta['fingerprint'] = {**old, 'params': checksum_of_params or old['params']}
    meta_file.write_text(json.dumps(meta))
    result = checkpoints.restore(train.abstract(state))
    checkpoints.close()
    if restored:
      step, back, meta = result
      assert step == 5 and meta == {'pending': []}
      chex.assert_trees_all_equal(back, state)
    else:
      assert result is None and os.listdir(directory / 'b') == ['5']


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------


_NAN = {'from_epoch': 1, 'kind': 'loss'}  # what the test term below breaks, and when


@dataclasses.dataclass(frozen=True)
class _Breaking(terms_lib.LossTerm):
  """Cross-entropy whose loss, or only its gradient, becomes NaN from a given epoch."""

  weight: float = 1.0
  name: str = 'breaking'

  def __call__(self, inputs, rows=None, carry=None):
    ce = losses.soft_target_cross_entropy(inputs.logits, inputs.one_hot)
    broken = inputs.epoch >= _NAN['from_epoch']
    if _NAN['kind'] == 'loss':
      return terms_lib.TermOutput(jnp.where(broken, jnp.nan, ce))
    # sqrt(s |z|) - sqrt(s |z|) is 0, and so is its gradient, except for s = 0, where the gradient
    # is 0 / 0 = NaN: a finite loss with a NaN gradient.
    scaled = jnp.where(broken, 0.0, 1.0) * jnp.abs(inputs.logits[:, 0])
    return terms_lib.TermOutput(ce + jnp.sqrt(scaled) - jnp.sqrt(scaled))


@pytest.fixture
def breaking_term(monkeypatch):
  module = types.SimpleNamespace(make=lambda settings, context: _Breaking())
  monkeypatch.setitem(sys.modules, 'skd_jax.terms.breaking', module)
  monkeypatch.setattr(terms_lib, 'settings', lambda: {'breaking': {'weight': 1.0}})
  config = runs.config('baseline')
  config.loss = {'breaking': {'weight': 1.0}}
  return config


@pytest.mark.parametrize(
    'kind, message',
    [('loss', 'loss is nan at step 6'), ('grad', 'gradient norm is nan at step 6')],
)
def test_divergence_stops_keeps_the_last_good_checkpoint_and_a_changed_lr_continues(
    tmp_path, monkeypatch, breaking_term, kind, message
):
  monkeypatch.setitem(_NAN, 'kind', kind)
  with pytest.raises(train.Diverged, match=message) as raised:
    runs.run(breaking_term, tmp_path)
  assert raised.value.kept_step == 5
  assert f'the checkpoint at step 5 is kept ({tmp_path}/checkpoints/5)' in str(raised.value)
  assert 'optim.lr' in str(raised.value)
  assert not (tmp_path / 'summary.json').exists() and not (tmp_path / 'model').exists()
  step, state = runs.restore(tmp_path)
  assert step == 5 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))

  # The documented way forward: the same workdir with another learning rate resumes at step 5.
  monkeypatch.setitem(_NAN, 'from_epoch', 99)
  breaking_term.optim.lr = 0.05
  runs.run(breaking_term, tmp_path)
  with open(tmp_path / 'config_changes.jsonl') as f:
    assert [json.loads(line) for line in f] == [{'step': 5, 'changes': {'optim.lr': [0.1, 0.05]}}]
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['optim']['lr'] == 0.05
  schedule = optim.make_schedule(breaking_term.optim, steps_per_epoch=5, num_epochs=2)
  record = next(r for r in runs.records(tmp_path, 'train') if r['step'] == 8)
  np.testing.assert_allclose(record['lr'], (schedule(6) + schedule(7)) / 2, rtol=1e-6)


def test_divergence_before_the_first_checkpoint_says_none_was_kept(
    tmp_path, monkeypatch, breaking_term
):
  monkeypatch.setitem(_NAN, 'from_epoch', 0)
  with pytest.raises(train.Diverged, match='loss is nan at step 1') as raised:
    runs.run(breaking_term, tmp_path)
  assert raised.value.kept_step is None
  assert 'no checkpoint was saved' in str(raised.value)


def test_a_resume_with_other_keys_is_refused_naming_them(tmp_path, monkeypatch):
  monkeypatch.setattr(preemption, 'reached', lambda step: True)
  with pytest.raises(train.Preempted):
    runs.run(runs.config('baseline'), tmp_path)
  changed = runs.config('baseline', num_epochs=3, seed=1)
  changed.optim.lr = 0.05  # resumable: not named
  with pytest.raises(ConfigError) as raised:
    runs.run(changed, tmp_path)
  message = str(raised.value)
  assert 'num_epochs (2 -> 3), seed (0 -> 1)' in message and 'optim.lr' not in message.split(';')[0]


def test_several_processes_without_jax_preemption_service_are_refused_in_one_line(monkeypatch):
  """Without JAX's native SIGTERM handler there is nothing to pass signals on to: a clear refusal,
  not a call through a null function pointer."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  assert preemption.install()
  try:
    with pytest.raises(ConfigError, match='^jax_enable_preemption_service: is off; '):
      preemption.join_processes()
    assert preemption.stop_before_training() is None  # still the single-process protocol
  finally:
    preemption.uninstall()
