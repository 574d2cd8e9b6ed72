"""The command line as users meet it: --help, one-line errors with exit status 2 and nothing
written, signals in every phase and in every process, a disk that fills up."""

import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

import runs
from skd_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """The runs here share a persistent compilation cache, as users' runs do by default (conftest.py
  turns it off for the command-line runs the tests start): a rerun loads what its first run
  compiled."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('SKD_JAX_COMPILATION_CACHE', str(tmp_path_factory.mktemp('xla_cache')))
    yield


@pytest.fixture(scope='module')
def tiny_fashion_mnist(tmp_path_factory):
  """96 train and 32 test images: 12 steps per epoch at batch size 8."""
  return runs.fashion_mnist(tmp_path_factory.mktemp('fmnist'), 96, 32)


def _quick(workdir, data_dir, num_epochs, *extra):
  """Arguments of the quick PS-KD config on a small Fashion-MNIST at batch size 8."""
  return (
      '--config=configs/pskd.py:quick',
      f'--workdir={workdir}',
      f'--config.data.dir={data_dir}',
      '--config.batch_size=8',
      f'--config.num_epochs={num_epochs}',
      *extra,
  )


def _main(*args, devices=1, **kwargs):
  """The command line in a new process; ``devices`` None: as many CPU devices as it chooses."""
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': str(devices), 'PYTHONPATH': REPO}
  if devices is None:
    del env['JAX_NUM_CPU_DEVICES']
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
        (
            ['--config.num_epoch=3'],
            1,
            '--config.num_epoch: unknown key; did you mean --config.num_epochs? (every key is '
            'listed by `python -m skd_jax.main --help`)',
        ),
        (['--config.optim.lr=inf'], 1, 'optim.lr: expected a finite number, got inf'),
        (['--config.optim.weight_decay=nan'], 1, 'optim.weight_decay: expected a finite number'),
        (['--config.optim.momentum=nan'], 1, 'optim.momentum: expected a finite number'),
        (['--config.loss.pskd.weight=nan'], 1, 'loss.pskd.weight: expected a finite number'),
        (['--config.keep_checkpoints=0'], 1, 'keep_checkpoints: expected an integer >= 1, got 0'),
        (['--config.keep_checkpoints=-1'], 1, 'keep_checkpoints: expected an integer >= 1'),
        (['--config.distributed=True'], 1, 'distributed: no Cloud TPU, SLURM, Open MPI'),
        (['--num_processes=2'], 1, '--coordinator_address, --process_id: expected together'),
        (['--config.loss.pskd.alpha_T=1.5'], 1, 'loss.pskd.alpha_T: expected a number in [0, 1]'),
        (['--config.batch_size=12'], 8, 'batch_size: 12 is not divisible by the 8 devices'),
        (['--config.data.dir=/no/such/dir'], 1, 'data.dir: /no/such/dir does not exist'),
        (['--config.optim.schedule=linear'], 1, "optim.schedule: expected 'step' or 'cosine'"),
        (['--config.data.pipeline=disk'], 1, "data.pipeline: expected 'device' or 'host'"),
        (['--config.teacher.workdir=/no/run'], 1, 'teacher.workdir: set, but no loss term uses'),
        (['--generations=2'], 1, '--generations: the config has no loss term that uses a teacher'),
        (['--config.optim={"lr": 0.1}'], 1, 'optim.boundaries: missing; a config starts from'),
    ],
)
def test_invalid_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, devices, message):
  workdir = tmp_path / 'wd'
  proc = _main('--config=configs/pskd.py:quick', f'--workdir={workdir}', *args, devices=devices)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2, stderr
  last = stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, stderr
  assert 'Traceback' not in stderr
  assert not workdir.exists()


_BAD_CONFIG_FILES = {
    'no_get_config.py': ('x = 1\n', 'has no get_config(arg) function'),
    'syntax.py': ('def get_config(:\n', 'does not load (SyntaxError: invalid syntax'),
    'imports.py': ('import no_such_module\n', 'does not load (ModuleNotFoundError: No module'),
    'raises.py': (
        'def get_config(arg=None):\n  raise RuntimeError("no such protocol")\n',
        'does not load (RuntimeError: no such protocol)',
    ),
    'returns_int.py': (
        'def get_config(arg=None):\n  return 3\n',
        ': get_config returned int, expected an ml_collections.ConfigDict',
    ),
}


def test_a_config_file_that_does_not_load_is_one_line_naming_it(tmp_path, capsys):
  """Each of these once ended in a traceback with status 1 (only ValueError and TypeError were
  caught, and the unknown-key path loaded the file again); in-process: no training starts."""
  from skd_jax import main  # pylint: disable=g-import-not-at-top

  cases = {tmp_path / name: message for name, (_, message) in _BAD_CONFIG_FILES.items()}
  for name, (text, _) in _BAD_CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  cases[tmp_path / 'missing.py'] = 'is not a file'
  for path, message in cases.items():
    with pytest.raises(SystemExit) as exit_:
      main._load_config_file(['main', f'--config={path}:quick', '--workdir=wd'])
    line = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and '\n' not in line, line
    assert line.startswith(f'error: --config: {path}') and message in line, line
  with pytest.raises(SystemExit):
    main._load_config_file(['main', '--workdir=wd'])
  assert capsys.readouterr().err == (
      'error: --config: expected a config file, e.g. --config=configs/pskd.py:quick\n'
  )
  pskd = os.path.join(REPO, 'configs', 'pskd.py')
  config = main._load_config_file(['main', '--config', f'{pskd}:quick', '--workdir=wd'])
  assert config.data.source == 'idx'  # '--config PATH' as absl reads it, too


@pytest.fixture(scope='module')
def empty_fashion_mnist(tmp_path_factory):
  """Valid idx files holding 0 examples."""
  return runs.fashion_mnist(tmp_path_factory.mktemp('empty'), 0, 0)


def test_bad_workdirs_and_empty_data_exit_2_with_one_line(tmp_path, empty_fashion_mnist):
  (tmp_path / 'file').write_text('')
  cases = [
      ([f'--workdir={tmp_path / "file"}'], f'workdir: {tmp_path / "file"} is a file'),
      ([f'--workdir={tmp_path / "file" / "wd"}'], f'lies under the file {tmp_path / "file"}'),
      (
          [f'--workdir={tmp_path / "wd"}', f'--config.data.dir={empty_fashion_mnist}'],
          'train-images-idx3-ubyte',
      ),
  ]
  for args, message in cases:
    proc = _main('--config=configs/pskd.py:quick', *args)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith('error: ') and message in stderr, stderr
    assert 'Traceback' not in stderr
  assert sorted(os.listdir(tmp_path)) == ['file'] and (tmp_path / 'file').read_text() == ''


def test_help_lists_the_configs_and_every_key_and_exits_0():
  proc = _main('--help')
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  for text in ('configs/NAME.py[:quick]', ':quick', 'pskd ', 'lsskd ', 'optim.lr = 0.1'):
    assert text in stdout, text
  for key in config_lib.KEYS:
    assert f'  {key}' in stdout, key
  assert 'pskd: weight=1.0, alpha_T=0.8' in stdout


def _read_until(proc, text, timeout=180):
  """Reads ``proc``'s stderr until a line contains ``text``; returns the lines read."""
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f'{text!r} never appeared in:\n{"".join(lines)}')


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_exits_cleanly_and_writes_nothing(
    tmp_path, tiny_fashion_mnist, sig
):
  workdir = tmp_path / 'wd'
  proc = _main(
      '--config=configs/pskd.py:quick',
      f'--workdir={workdir}',
      f'--config.data.dir={tiny_fashion_mnist}',
  )
  _read_until(proc, 'Devices:')  # start-up has begun: data, model and compilation follow
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  assert f'{sig.name} during start-up: stopped before training; nothing was written' in stderr
  assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
  assert not workdir.exists()


def test_missing_config_file_exits_2(tmp_path):
  proc = _main('--config=configs/nope.py', f'--workdir={tmp_path / "wd"}')
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2 and stderr.strip().splitlines()[-1].startswith('error: ')


def test_sigterm_saves_exits_cleanly_and_rerun_finishes(tmp_path, tiny_fashion_mnist):
  workdir = tmp_path / 'wd'
  args = _quick(workdir, tiny_fashion_mnist, 10, '--config.log_every_steps=1')
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
  assert saved and max(saved) < 10 * 12

  proc = _main(*args)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['steps'] == 10 * 12 and json.loads(stdout) == summary
  # Written to a pipe (a log file, SLURM): start-up facts, then one line per train record with
  # the rate and the ETA measured after compilation; no progress-bar carriage returns.
  assert '\r' not in stderr
  for fact in ('Devices: 1 x cpu', 'Data: fashion_mnist, 96 training', 'parameters. Loss: 1 pskd'):
    assert fact in stderr, fact
  compiled = stderr.index('Compiled the train and evaluation steps')
  assert compiled < stderr.index(f'step {max(saved) + 1}/120 (epoch ') and 'img/s, ETA' in stderr


@pytest.mark.parametrize(
    'devices, batch_size, want',
    [(None, 8, 2), (None, 9, 1), (1, 8, 1)],
    ids=['one per cpu', 'a count dividing the batch', 'as told'],
)
def test_a_cpu_run_splits_the_batch_over_one_device_per_cpu(
    tmp_path, tiny_fashion_mnist, devices, batch_size, want
):
  cpus = set(sorted(os.sched_getaffinity(0))[:2])
  want = min(want, len(cpus))  # a 1-CPU machine makes one device
  proc = _main(
      '--config=configs/pskd.py:quick',
      f'--workdir={tmp_path / "wd"}',
      f'--config.data.dir={tiny_fashion_mnist}',
      f'--config.batch_size={batch_size}',
      '--config.eval_batch_size=16',
      devices=devices,
      preexec_fn=lambda: os.sched_setaffinity(0, cpus),
  )
  lines = []
  for line in proc.stderr:  # stop it once the devices are logged: a signal in start-up
    lines.append(line)
    if 'Devices: ' in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.communicate(timeout=120)[1].splitlines()
  assert proc.returncode == 0, ''.join(lines)
  assert any(f'Devices: {want} x cpu in 1 process(es)' in line for line in lines), ''.join(lines)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigint_to_one_of_two_processes_stops_both_at_one_step_and_the_rerun_finishes(
    tmp_path, tiny_fashion_mnist
):
  """SIGINT reaches JAX's preemption service only through our handler; SIGTERM goes there anyway."""
  workdir = tmp_path / 'wd'
  args = _quick(workdir, tiny_fashion_mnist, 10, '--config.log_every_steps=1')

  def start():
    cluster = (f'--coordinator_address=localhost:{_free_port()}', '--num_processes=2')
    return [_main(*args, *cluster, f'--process_id={i}') for i in range(2)]

  procs = start()
  _read_until(procs[0], 'step 1/120')  # process 0 logs the train records: training is on
  procs[1].send_signal(signal.SIGINT)
  results = [p.communicate(timeout=120) for p in procs]
  for proc, (_, stderr) in zip(procs, results):
    assert proc.returncode == 0, stderr
  saved = [re.search(r'saved a checkpoint at step (\d+)', stderr) for _, stderr in results]
  assert saved[0] and saved[1] and saved[0].group(1) == saved[1].group(1), results
  assert 'SIGINT: saved' in results[1][1] and 'a signal to another process: saved' in results[0][1]
  assert int(saved[0].group(1)) in [int(d) for d in os.listdir(workdir / 'checkpoints')]

  procs = start()
  results = [p.communicate(timeout=600) for p in procs]
  for proc, (_, stderr) in zip(procs, results):
    assert proc.returncode == 0, stderr
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == 10 * 12


@pytest.mark.slow
def test_a_failed_save_stops_the_run_at_once_in_one_line_and_keeps_the_last_checkpoint(tmp_path):
  """The disk fills up after the first checkpoint (a file-size limit gives the same write error)."""
  workdir = tmp_path / 'wd'
  data = runs.fashion_mnist(tmp_path, 480, 32)  # epochs of 60 steps
  args = _quick(workdir, data, 6, '--config.log_every_steps=1')
  proc = _main(*args)
  _read_until(proc, 'epoch 1/6:')  # the first evaluation; its checkpoint follows
  deadline = time.time() + 60
  while not (workdir / 'checkpoints' / '60' / 'commit_success.txt').exists():
    assert time.time() < deadline and proc.poll() is None
    time.sleep(0.01)
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # a checkpoint is ~1 MB
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 1, stderr
  lines = stderr.strip().splitlines()
  assert 'Traceback' not in stderr, stderr
  assert re.fullmatch(
      r'error: checkpoint: saving step (\d+) to \S+/checkpoints/\1 failed: File too large '
      r'\(errno 27\); stopped, the previous checkpoint is intact',
      lines[-1],
  ), stderr
  failed = int(re.search(r'saving step (\d+)', lines[-1]).group(1))
  # Reported when it happened: no evaluation after the epoch whose checkpoint failed.
  evals = [json.loads(l)['step'] for l in open(workdir / 'metrics.jsonl') if '"eval"' in l]
  assert max(evals) == failed
  proc = _main(*args)  # the rerun resumes from the intact checkpoint and finishes
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  assert 'Resumed from the checkpoint at step' in stderr
  assert json.loads(stdout)['steps'] == 6 * 60


_LEFT_BY_FAILED_IO = """
import sys
from skd_jax import main

main._quiet_failed_io()

async def write_fragment():  # an orbax write that never started
  pass

class Suspend:
  def __await__(self):
    yield

async def read_shard():  # as orbax reads an array: any exception, GeneratorExit too, rewrapped
  try:
    await Suspend()
  except BaseException as e:
    raise Exception('Encountered error while reading array index') from e

class Raises:
  def __init__(self, error):
    self.error = error

  def __del__(self):
    raise self.error

never_awaited = write_fragment()
pending_read = read_shard()
pending_read.send(None)
print('error: the one line', file=sys.stderr)
# After the error line, as the process exits:
del never_awaited  # Python reports a coroutine that never ran
del pending_read  # closed while waiting (another read failed): raises instead of exiting
Raises(RuntimeError('Event loop is closed'))  # a write that ended after orbax closed its loop
Raises(ValueError('any other unraisable error'))  # still reported
sys.exit(1)
"""


def test_what_failed_orbax_saves_and_reads_leave_behind_stays_off_stderr():
  """What a failed orbax save or read leaves behind prints nothing after the one-line error: a
  write coroutine that never ran, writes that end after orbax closed the save's event loop, reads
  closed while pending. The command-line tests meet them by chance (the failed save once failed
  on the first); here they are made on purpose."""
  proc = subprocess.run(
      [sys.executable, '-c', _LEFT_BY_FAILED_IO],
      env={**os.environ, 'PYTHONPATH': REPO},
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 1
  assert 'error: the one line' in proc.stderr
  assert 'ValueError: any other unraisable error' in proc.stderr
  assert 'Event loop is closed' not in proc.stderr, proc.stderr
  assert 'never awaited' not in proc.stderr, proc.stderr
  assert 'reading array index' not in proc.stderr, proc.stderr


def test_a_checkpoint_that_does_not_restore_is_skipped_in_one_line(tmp_path, tiny_fashion_mnist):
  """Orbax's reads of a truncated checkpoint fail together: one log line says which and why."""
  workdir = tmp_path / 'wd'
  args = _quick(workdir, tiny_fashion_mnist, 2)
  proc = _main(*args)
  assert proc.wait(timeout=600) == 0
  (workdir / 'summary.json').unlink()  # as if stopped after its last checkpoint
  data = [p for p in (workdir / 'checkpoints' / '24' / 'state').rglob('*') if p.is_file()]
  largest = max(data, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  stdout, stderr = _main(*args).communicate(timeout=600)
  assert json.loads(stdout)['steps'] == 24, stderr
  assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr
  skipped = [l for l in stderr.splitlines() if 'Skipped the checkpoint' in l]
  assert len(skipped) == 1, stderr
  assert re.search(
      r'Skipped the checkpoint at step 24: it does not restore \(OUT_OF_RANGE: Error reading "'
      r'[^"]+" in OCDBT database at local file "\S+/checkpoints/24/state/": ',
      skipped[0],
  ), skipped[0]
  assert 'Resumed from the checkpoint at step 12' in stderr
  assert os.listdir(workdir / 'broken_checkpoints') == ['24']
