"""The workdir's files: permissions, torn lines, the config-change history, the training set,
damaged files, bad paths."""

import importlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import pytest

import runs
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError


def _config(**optim):
  return ml_collections.ConfigDict(
      {'seed': 0, 'num_epochs': 2, 'optim': {'lr': 0.1, 'momentum': 0.9, **optim}}
  )


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_files_get_ordinary_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    workdir = workdir_lib.Workdir(str(tmp_path / 'wd'), _config(), is_main=True)
    workdir.begin(0)
    workdir.write_summary({'top1': 1.0})
  finally:
    os.umask(old)
  for name in ('config.json', 'summary.json'):
    assert stat.S_IMODE(os.stat(tmp_path / 'wd' / name).st_mode) == 0o644, name


def test_begin_drops_torn_lines_and_records_past_the_step(tmp_path, caplog):
  workdir = workdir_lib.Workdir(str(tmp_path), _config(), is_main=True)
  workdir.begin(0)
  for step in (2, 4, 6):
    workdir.log({'kind': 'train', 'step': step})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"kind": "train", "st')
  assert [r['step'] for r in workdir.records()] == [2, 4, 6]  # the torn line never breaks a read
  workdir.begin(4)
  assert [r['step'] for r in _lines(tmp_path / 'metrics.jsonl')] == [2, 4]
  assert any('1 line(s) that do not parse' in r.getMessage() for r in caplog.records)
  workdir.begin(0)  # a start from scratch keeps nothing
  assert _lines(tmp_path / 'metrics.jsonl') == []


def test_changes_are_recorded_with_the_step_and_undone_steps_are_recomposed(tmp_path):
  workdir_lib.Workdir(str(tmp_path), _config(), is_main=True).begin(0)
  workdir_lib.Workdir(str(tmp_path), _config(lr=0.05), is_main=True).begin(10)
  workdir_lib.Workdir(str(tmp_path), _config(lr=0.05), is_main=True).begin(20)  # no change
  assert _lines(tmp_path / 'config_changes.jsonl') == [
      {'step': 10, 'changes': {'optim.lr': [0.1, 0.05]}}
  ]
  # Resumed from step 5 (checkpoint 10 broken, say): from 5 on the run trains with both changes.
  workdir_lib.Workdir(str(tmp_path), _config(lr=0.05, momentum=0.5), is_main=True).begin(5)
  assert _lines(tmp_path / 'config_changes.jsonl') == [
      {'step': 5, 'changes': {'optim.lr': [0.1, 0.05], 'optim.momentum': [0.9, 0.5]}}
  ]
  assert json.loads((tmp_path / 'config.json').read_text())['optim'] == {
      'lr': 0.05,
      'momentum': 0.5,
  }


def test_other_changes_are_refused_before_writing(tmp_path):
  workdir_lib.Workdir(str(tmp_path), _config(), is_main=True).begin(0)
  before = (tmp_path / 'config.json').read_text()
  changed = _config(lr=0.01)
  changed.num_epochs = 4
  with pytest.raises(ConfigError, match=r'different config: num_epochs \(2 -> 4\); only optim'):
    workdir_lib.Workdir(str(tmp_path), changed, is_main=True)
  assert (tmp_path / 'config.json').read_text() == before
  assert not (tmp_path / 'config_changes.jsonl').exists()


def test_keys_newer_than_the_run_resume_at_their_defaults_and_are_refused_otherwise(tmp_path):
  """A run started by an older skd_jax has no distributed_timeout_seconds or loss.pskd.storage."""
  config = _config()
  config.loss = {'pskd': {'weight': 1.0}}
  workdir_lib.Workdir(str(tmp_path), config, is_main=True).begin(0)
  config.distributed_timeout_seconds = 100  # base_config's default
  config.loss.pskd.storage = 'float32'  # the term's default
  workdir_lib.Workdir(str(tmp_path), config, is_main=True).begin(10)
  assert not (tmp_path / 'config_changes.jsonl').exists()
  assert json.loads((tmp_path / 'config.json').read_text())['loss']['pskd']['storage'] == 'float32'

  (tmp_path / 'config.json').write_text(json.dumps(_config().to_dict()))  # the old file again
  config.loss.pskd.storage = 'top_k'
  with pytest.raises(ConfigError, match=r"loss.pskd.storage \(None -> 'top_k'\)"):
    workdir_lib.Workdir(str(tmp_path), config, is_main=True)


def test_a_loss_term_added_or_removed_is_refused_even_at_its_default_settings(tmp_path):
  """Only keys skd_jax adds are implied at their defaults: a term the run lacks is a change, even
  one that keeps no state (before, cross_entropy at its default weight was taken for no change,
  and the run restarted from scratch over the workdir)."""
  config = _config()
  config.loss = {'pskd': {'weight': 1.0, 'alpha_T': 0.8}}
  workdir_lib.Workdir(str(tmp_path), config, is_main=True).begin(0)
  (tmp_path / 'metrics.jsonl').write_text('{"kind": "train", "step": 2}\n')
  before = _contents(tmp_path)
  added = ml_collections.ConfigDict(config.to_dict())
  added.loss.cross_entropy = {'weight': 1.0}  # cross_entropy's default weight
  removed = ml_collections.ConfigDict(config.to_dict())
  del removed.loss['pskd']
  removed.loss.cross_entropy = {'weight': 1.0}
  plugin = _config()
  plugin.loss = {'pskd': {'module': 'mylab.pskd', 'weight': 1.0}}
  plugin_setting = ml_collections.ConfigDict(plugin.to_dict())
  plugin_setting.loss.pskd.alpha_T = 0.8  # the built-in pskd's default, not the plug-in's
  for now, message in [
      (added, r'loss.cross_entropy.weight \(None -> 1.0\); only '),
      (removed, r'loss.cross_entropy.weight \(None -> 1.0\), loss.pskd.alpha_T \(0.8 -> None\), '),
  ]:
    with pytest.raises(
        ConfigError,
        match=f'^workdir: {tmp_path} holds a run with a different config: {message}',
    ) as refused:
      workdir_lib.Workdir(str(tmp_path), now, is_main=True)
    assert '\n' not in str(refused.value)
    assert _contents(tmp_path) == before  # nothing written
  shutil.rmtree(tmp_path)
  workdir_lib.Workdir(str(tmp_path), plugin, is_main=True).begin(0)
  with pytest.raises(ConfigError, match=r'different config: loss.pskd.alpha_T \(None -> 0.8\); '):
    workdir_lib.Workdir(str(tmp_path), plugin_setting, is_main=True)


def _identity(examples=40, labels='7e37e8558ec9' + '0' * 52):
  return {
      'source': 'idx',
      'name': 'fashion_mnist',
      'split': 'train',
      'examples': examples,
      'labels_sha256': labels,
  }


def _contents(root):
  """Every file under ``root`` with its bytes."""
  files = {}
  for directory, _, names in os.walk(root):
    for name in names:
      with open(os.path.join(directory, name), 'rb') as f:
        files[os.path.relpath(os.path.join(directory, name), root)] = f.read()
  return files


def test_another_training_set_is_refused_and_the_same_one_found_elsewhere_is_not(tmp_path):
  config = _config()
  config.data = {'dir': '/data/a'}
  workdir = workdir_lib.Workdir(str(tmp_path), config, is_main=True)
  workdir.check_data(_identity())
  workdir.begin(0)
  assert json.loads((tmp_path / 'data.json').read_text()) == _identity()
  before = _contents(tmp_path)
  config.data.dir = '/data/b'
  for other in (_identity(examples=36), _identity(labels='5' * 64)):
    with pytest.raises(ConfigError) as e:
      workdir_lib.Workdir(str(tmp_path), config, is_main=True).check_data(other)
    assert str(e.value) == (
        f"data: {tmp_path} holds a run trained on 40 examples of fashion_mnist 'train' (labels "
        f"sha256 7e37e8558ec9); this config reads {other['examples']} examples of fashion_mnist "
        f"'train' (labels sha256 {other['labels_sha256'][:12]}) from /data/b; resume with the "
        'same training set or use a new --workdir'
    )
  assert _contents(tmp_path) == before
  moved = workdir_lib.Workdir(str(tmp_path), config, is_main=True)  # data.dir may change
  moved.check_data(_identity())
  moved.begin(0)
  assert json.loads((tmp_path / 'data.json').read_text()) == _identity()


def test_a_workdir_written_before_data_json_records_it_when_resumed(tmp_path):
  workdir_lib.Workdir(str(tmp_path), _config(), is_main=True).begin(0)  # as an older skd_jax did
  assert not (tmp_path / 'data.json').exists()
  workdir = workdir_lib.Workdir(str(tmp_path), _config(), is_main=True)
  workdir.check_data(_identity())
  workdir.begin(10)
  assert json.loads((tmp_path / 'data.json').read_text()) == _identity()


@pytest.mark.parametrize(
    'name, text, problem',
    [
        ('config.json', b'\x00\xff\x13garbage', 'not text'),
        ('config.json', b'', 'empty'),
        ('config.json', b'{\n  "optim": {"lr": 0.1', "not JSON (line 2: Expecting ',' delimiter)"),
        ('data.json', b'[40]', 'a JSON list'),
        ('data.json', b'{"examples": 4', "not JSON (line 1: Expecting ',' delimiter)"),
    ],
)
def test_a_damaged_config_or_data_json_is_refused_in_one_line_before_loading_data(
    tmp_path, name, text, problem
):
  """Through the trainer: refused before the data (a missing folder here) is looked at."""
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.data.dir = str(tmp_path / 'no_data')
  workdir = tmp_path / 'wd'
  workdir.mkdir()
  (workdir / 'config.json').write_text(config.to_json_best_effort(sort_keys=True, indent=2))
  (workdir / name).write_bytes(text)
  before = _contents(workdir)
  with pytest.raises(ConfigError) as e:
    train.train_and_evaluate(config, str(workdir), devices=jax.devices()[:1])
  message = str(e.value)
  assert message.startswith(f'workdir: {workdir / name} is {problem}') and '\n' not in message
  assert message.endswith(
      'as a JSON object written by skd_jax; restore the file or use a new --workdir'
  )
  assert _contents(workdir) == before


def _tiny_run(data_dir):
  """PS-KD (a per-example history) on idx Fashion-MNIST in ``data_dir``: 1 epoch of 5 steps."""
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.data.dir, config.num_epochs, config.batch_size, config.eval_batch_size = data_dir, 1, 8, 8
  config.model.widths = (4, 8, 8)
  return config


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A workdir trained on 40 idx examples, and its data folder."""
  data = runs.fashion_mnist(tmp_path_factory.mktemp('data'), 40, 8)
  workdir = tmp_path_factory.mktemp('run')
  summary = train.train_and_evaluate(_tiny_run(data), str(workdir), devices=jax.devices()[:1])
  return workdir, data, summary


def _other_labels(directory):
  """The same 40 images, the labels shifted by one class."""
  with open(os.path.join(directory, 'train-labels-idx1-ubyte'), 'r+b') as f:
    header, labels = f.read(8), f.read()
    f.seek(0)
    f.write(header + bytes((label + 1) % 10 for label in labels))


@pytest.mark.slow
@pytest.mark.parametrize('examples, change', [(36, None), (40, _other_labels)])
def test_resuming_on_another_training_set_is_refused_and_moves_nothing(
    tmp_path, finished_run, examples, change
):
  """Before, a history of another size declared the intact checkpoint broken and restarted."""
  workdir = tmp_path / 'wd'
  shutil.copytree(finished_run[0], workdir)
  data = runs.fashion_mnist(tmp_path, examples, 8)
  if change:
    change(data)
  before = _contents(workdir)
  with pytest.raises(ConfigError, match=f'^data: {workdir} holds a run trained on 40 examples'):
    train.train_and_evaluate(_tiny_run(data), str(workdir), devices=jax.devices()[:1])
  assert _contents(workdir) == before  # the checkpoint in place, metrics.jsonl byte for byte


@pytest.mark.slow
def test_the_same_training_set_in_another_folder_resumes(tmp_path, finished_run):
  original, data, summary = finished_run
  workdir, moved = tmp_path / 'wd', tmp_path / 'moved'
  shutil.copytree(original, workdir)
  shutil.copytree(data, moved)
  resumed = train.train_and_evaluate(_tiny_run(str(moved)), str(workdir), devices=jax.devices()[:1])
  assert {k: v for k, v in resumed.items() if k != 'train_seconds'} == {
      k: v for k, v in summary.items() if k != 'train_seconds'
  }
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['5']
  assert not (workdir / 'broken_checkpoints').exists()
  assert _lines(workdir / 'config_changes.jsonl') == [
      {'step': 5, 'changes': {'data.dir': [data, str(moved)]}}
  ]


def test_check_path_rejects_files_and_paths_under_files(tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(ConfigError, match='is a file; expected a directory'):
    workdir_lib.check_path(str(tmp_path / 'file'))
  with pytest.raises(ConfigError, match='lies under the file'):
    workdir_lib.check_path(str(tmp_path / 'file' / 'a' / 'b'))
  workdir_lib.check_path(str(tmp_path / 'new' / 'deeper'))  # creatable
  assert not (tmp_path / 'new').exists()


@pytest.fixture
def public_tmp():
  """A temporary directory that every user may traverse (pytest's tmp_path is private)."""
  path = tempfile.mkdtemp()
  os.chmod(path, 0o755)
  yield pathlib.Path(path)
  shutil.rmtree(path)


# The child runs no JAX code (only os calls and the check), so JAX's warning about forking a
# multithreaded process does not apply.
@pytest.mark.filterwarnings('ignore:os.fork:RuntimeWarning')
def test_check_path_rejects_a_directory_this_user_cannot_write(public_tmp):
  """Root may write anywhere, so the check runs in a child that drops to an unprivileged user."""
  locked = public_tmp / 'locked'
  locked.mkdir(mode=0o555)
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:  # the child: only Python and the already imported module, no JAX
    os.close(read)
    try:
      if os.geteuid() == 0:
        os.setgid(65534)
        os.setuid(65534)
      try:
        workdir_lib.check_path(str(locked / 'wd'))
        message = 'accepted'
      except ConfigError as e:
        message = str(e)
      os.write(write, message.encode())
    finally:
      os._exit(0)
  os.close(write)
  with os.fdopen(read) as f:
    message = f.read()
  os.waitpid(pid, 0)
  assert message == f'workdir: {locked} is not writable; expected a writable directory'


@pytest.mark.slow
def test_an_unreachable_gs_workdir_exits_2_in_one_line_quickly_and_creates_nothing(tmp_path):
  """Offline, with no credentials: one line naming the workdir, in seconds, no local ./gs: folder."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {
      k: v
      for k, v in os.environ.items()
      if k not in ('GOOGLE_APPLICATION_CREDENTIALS', 'STORAGE_EMULATOR_HOST')
  }
  env.update(
      PYTHONPATH=repo,
      JAX_NUM_CPU_DEVICES='1',
      CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'),  # no `gcloud auth` credentials
      # The search for credentials asks the Compute Engine metadata server: keep it on this machine.
      GCE_METADATA_HOST='127.0.0.1:9',
      GCE_METADATA_IP='127.0.0.1:9',
  )
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  start = time.monotonic()
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'skd_jax.main',
          f'--config={repo}/configs/pskd.py:quick',
          '--workdir=gs://skd-jax-test/run',
      ],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  seconds = time.monotonic() - start
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: workdir: gs://skd-jax-test/run: no Google Cloud credentials found; expected `gcloud '
      'auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS or a Cloud VM'
  )
  assert 'Traceback' not in proc.stderr
  assert seconds < 40, seconds  # imports and one failed look-up; gcsfs alone retries for ~44 s
  assert os.listdir(cwd) == []
  assert not any(os.path.exists(os.path.join(d, 'gs:')) for d in (repo, tempfile.gettempdir()))
