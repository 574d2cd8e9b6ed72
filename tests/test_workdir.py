"""The workdir's files: permissions, torn lines, the config-change history, bad paths."""

import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import time

import ml_collections
import pytest

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
