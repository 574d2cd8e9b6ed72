"""Several processes on this machine (launch/local.sh): 2 processes x 2 devices train as 1 x 4,
deterministically, through a preemption, each reading its own share; a dead process stops the
other at once.

One config holds every kind of per-example state (PS-KD rows, DLB's carry, DSR's carry, CS-KD's
partner sampler), on the host-streaming source, so one set of runs covers them all.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import runs

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, BATCH = 48, 8
STEPS_PER_EPOCH, EPOCHS = NUM_TRAIN // BATCH, 4
TOTAL = STEPS_PER_EPOCH * EPOCHS

# Every stateful term at once, on top of configs/pskd_dlb.py.
_CONFIG = """
from configs import pskd_dlb


def get_config(arg=None):
  config = pskd_dlb.get_config('quick')
  config.loss.dsr = dict(weight=1.0, temperature=4.0)
  config.loss.cskd = dict(weight=1.0, temperature=4.0)
  return config
"""

# On PYTHONPATH of the runs: logs every read of the real Fashion-MNIST reader, with the process,
# the step and the read's position within the step (0: the main group, then partners, previous).
_SITECUSTOMIZE = """
import json, os, threading

from skd_jax.data import idx, streaming

_local, _lock = threading.local(), threading.Lock()
_call, _read = streaming.StepReader.__call__, idx.FashionMnistRecords.read


def _step_call(self, step):
  _local.step, _local.position = step, 0
  return _call(self, step)


def _logged_read(self, index):
  import jax

  if getattr(_local, 'step', None) is not None and len(self) == {num_train}:
    line = dict(process=jax.process_index(), step=_local.step, position=_local.position,
                index=[int(i) for i in index])
    _local.position += 1
    with _lock, open(os.path.join(os.environ['READ_LOG'], f'{{line["process"]}}.jsonl'), 'a') as f:
      f.write(json.dumps(line) + '\\n')
  return _read(self, index)


streaming.StepReader.__call__ = _step_call
idx.FashionMnistRecords.read = _logged_read

# SIGNAL=PROCESS:WHERE:NAME: process PROCESS sends itself the signal NAME (e.g. SIGKILL) while it
# opens the data during start-up (WHERE=start) or once it has started saving the checkpoint of
# step WHERE (the save still runs in the background), after writing the time to READ_LOG/signalled.
if os.environ.get('SIGNAL'):
  import signal, time

  from skd_jax import checkpoints

  _process, _where, _name = os.environ['SIGNAL'].split(':')
  _open_splits, _save = streaming.open_splits, checkpoints.Checkpoints.save

  def _signal_if(where):
    import jax

    if (jax.process_index(), where) == (int(_process), _where):
      with open(os.path.join(os.environ['READ_LOG'], 'signalled'), 'w') as f:
        f.write(repr(time.time()))
      os.kill(os.getpid(), getattr(signal, _name))

  def _signalling_open_splits(*args, **kwargs):
    _signal_if('start')
    return _open_splits(*args, **kwargs)

  def _signalling_save(self, step, state, meta):
    _save(self, step, state, meta)
    _signal_if(str(step))

  streaming.open_splits = _signalling_open_splits
  checkpoints.Checkpoints.save = _signalling_save
"""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('multiprocess')
  (root / 'hooks').mkdir()
  (root / 'hooks' / 'sitecustomize.py').write_text(_SITECUSTOMIZE.format(num_train=NUM_TRAIN))
  (root / 'combined.py').write_text(_CONFIG)
  (root / 'data').mkdir()
  return dict(root=root, data=runs.fashion_mnist(root / 'data', NUM_TRAIN, 16))


def _env(setup, read_log, **variables):
  """The runs share a persistent compilation cache, as users' runs do by default (conftest.py
  turns it off for the command-line runs the tests start): only process 0 writes it, so the two
  processes of a run find the same programs there, or process 1 finds what process 0 just
  compiled, and catches up."""
  read_log.mkdir(exist_ok=True)
  return {
      **os.environ,
      'SKD_JAX_COMPILATION_CACHE': str(setup['root'] / 'xla_cache'),
      **variables,
      'PATH': f'{os.path.dirname(sys.executable)}:{os.environ["PATH"]}',
      'PYTHONPATH': f'{setup["root"] / "hooks"}:{REPO}',
      'READ_LOG': str(read_log),
  }


def _args(setup, workdir, *extra):
  return (
      f'--config={setup["root"] / "combined.py"}',
      f'--workdir={workdir}',
      f'--config.data.dir={setup["data"]}',
      '--config.data.pipeline=host',
      f'--config.batch_size={BATCH}',
      '--config.eval_batch_size=16',
      f'--config.num_epochs={EPOCHS}',
      f'--config.keep_checkpoints={EPOCHS}',  # every epoch's, to compare
      '--config.log_every_steps=1',
      *extra,
  )


def _local(setup, name, processes, devices, *extra, **variables):
  """``launch/local.sh`` on the combined config in ``root/name``, started (a Popen), with the
  environment ``variables`` of the hooks above."""
  workdir = setup['root'] / name
  return subprocess.Popen(
      ['launch/local.sh', str(processes), str(devices), *_args(setup, workdir, *extra)],
      cwd=REPO,
      env=_env(setup, setup['root'] / f'{name}_reads', **variables),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


def _finish(proc):
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr
  return stdout, stderr


def _run(setup, name, processes, devices):
  _finish(_local(setup, name, processes, devices))
  return setup['root'] / name


@pytest.fixture(scope='module')
def two_by_two(setup):
  return _run(setup, 'two_by_two', 2, 2)


@pytest.fixture(scope='module')
def one_by_four(setup):
  return _run(setup, 'one_by_four', 1, 4)


def _train_records(workdir):
  return [r for r in runs.without_time(runs.records(workdir)) if r['kind'] == 'train']


def _restore(workdir, step=None):
  """``(step, state)`` of a checkpoint (default: the latest), on one device of this process (a
  2-process checkpoint names devices this process does not have, so it cannot be restored as
  saved)."""
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    step = manager.latest_step() if step is None else step
  path = workdir / 'checkpoints' / str(step) / 'state'
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata,
    )
    return step, checkpointer.restore(path, target)


def _state(workdir, step=TOTAL):
  _, state = _restore(workdir, step)
  assert set(state['carry']) >= {'cskd', 'dlb', 'dsr', 'pskd'}, set(state['carry'])
  assert state['rows']['pskd'].shape[0] >= NUM_TRAIN
  return state


def _differences(a, b) -> dict[str, float]:
  """Largest absolute difference of every float array of two states, over the array's largest
  magnitude; other arrays must be equal."""
  differences = {}
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
    assert x.shape == y.shape and x.dtype == y.dtype, name
    if np.issubdtype(x.dtype, np.floating):
      scale = max(float(np.max(np.abs(y), initial=0.0)), 1e-6)
      differences[name] = float(np.max(np.abs(x - y), initial=0.0)) / scale
    else:
      np.testing.assert_array_equal(x, y, err_msg=name)
  return differences


def _report(what, differences):
  largest = max(differences, key=differences.get)
  identical = sum(v == 0 for v in differences.values())
  print(
      f'\n2x2 vs 1x4, {what}: largest difference {differences[largest]:.2g} at {largest}; '
      f'{identical} of {len(differences)} identical'
  )
  return differences[largest]


def test_two_by_two_trains_as_one_by_four(two_by_two, one_by_four):
  """Losses, parameters, PS-KD rows and every carry agree to float reduction noise.

  Not bit for bit: the 4 devices of one process are reduced by XLA's in-process collectives and
  those of 2 processes by gloo's, which add in another order. The last bits differ from the first
  step (the per-device work is the same: 2 examples per device in both); 24 steps of SGD at lr
  0.1 on random images then amplify them, so the end state gets a looser bound than the first
  epoch's.
  """
  two, one = _train_records(two_by_two), _train_records(one_by_four)
  assert [r['step'] for r in two] == [r['step'] for r in one] == list(range(1, TOTAL + 1))
  keys = [k for k in two[0] if k.startswith('loss') or k == 'grad_norm']
  # Step 1 (values 0.03 to 2.3): absolute differences, a few float32 ulps.
  first = _report('step 1 losses, absolute', {k: abs(two[0][k] - one[0][k]) for k in keys})
  run = _report(
      f'losses of all {TOTAL} steps',
      {k: max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-2) for x, y in zip(two, one)) for k in keys},
  )
  epoch = _report(
      f'state at step {STEPS_PER_EPOCH}',
      _differences(_state(two_by_two, STEPS_PER_EPOCH), _state(one_by_four, STEPS_PER_EPOCH)),
  )
  end = _report(f'state at step {TOTAL}', _differences(_state(two_by_two), _state(one_by_four)))
  assert first < 2e-6 and run < 1e-2 and epoch < 1e-4 and end < 0.2, (first, run, epoch, end)


def test_a_preempted_two_by_two_run_resumes_bit_identically(setup, two_by_two):
  """SIGTERM to the launcher mid-run; the rerun finishes exactly as the uninterrupted run (which
  makes the 2 x 2 run a second time, bit-identical)."""
  proc = _local(setup, 'preempted', 2, 2)
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f'step 1/{TOTAL}' in line:
      break
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, ''.join(lines) + stderr
  # Both processes got the SIGTERM (the launcher forwards it) and say so.
  assert 'steps' not in stdout and stderr.count('SIGTERM: saved a checkpoint at step') == 2, stderr
  stopped, _ = _restore(setup['root'] / 'preempted')
  assert 0 < stopped < TOTAL
  _finish(_local(setup, 'preempted', 2, 2))
  resumed = setup['root'] / 'preempted'
  assert json.loads((resumed / 'summary.json').read_text())['steps'] == TOTAL
  assert runs.without_time(runs.records(resumed)) == runs.without_time(runs.records(two_by_two))
  jax.tree.map(np.testing.assert_array_equal, _state(resumed), _state(two_by_two))


def _reads(read_log):
  """``{(process, step, position): index}`` of a run's reads of the training split's steps (the
  pipeline also reads a few steps past the last one ahead)."""
  reads = {}
  for name in os.listdir(read_log):
    with open(read_log / name) as f:
      for line in filter(lambda line: line['step'] < TOTAL, map(json.loads, f)):
        key = (line['process'], line['step'], line['position'])
        assert reads.setdefault(key, line['index']) == line['index'], key  # a step read again
  return reads


def test_each_process_reads_its_own_share_and_every_example_once_per_epoch(
    setup, two_by_two, one_by_four
):
  two = _reads(setup['root'] / 'two_by_two_reads')
  one = _reads(setup['root'] / 'one_by_four_reads')
  groups = 3  # main, partner, previous
  assert len(one) == TOTAL * groups and len(two) == 2 * TOTAL * groups
  half = BATCH // 2
  for (process, step, position), index in two.items():
    # Process p reads slots [p B / 2, (p + 1) B / 2) of what one process reads for the same step.
    assert index == one[(0, step, position)][process * half : (process + 1) * half]
  for epoch in range(EPOCHS):
    steps = range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
    main = sorted(i for p in (0, 1) for s in steps for i in two[(p, s, 0)])
    assert main == list(range(NUM_TRAIN)), epoch


def _child(parent: int, text: str) -> int:
  """The child process of ``parent`` whose command line contains ``text``."""
  for pid in open(f'/proc/{parent}/task/{parent}/children').read().split():
    if text in open(f'/proc/{pid}/cmdline').read().replace('\0', ' '):
      return int(pid)
  raise AssertionError(f'no child of {parent} with {text!r}')


def test_a_killed_process_stops_the_other_at_once_in_one_line(setup):
  """SIGKILL to process 1 mid-training: process 0 exits 1 with one line, well within the timeout,
  and so does the launcher (before, process 0 waited 60-90 s at jax.distributed's shutdown
  barrier, then aborted with SIGABRT)."""
  timeout = 30
  proc = _local(setup, 'killed', 2, 2, f'--config.distributed_timeout_seconds={timeout}')
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if f'step 1/{TOTAL}' in line:
      break
  os.kill(_child(proc.pid, '--process_id=1'), signal.SIGKILL)
  killed = time.monotonic()
  _, stderr = proc.communicate(timeout=120)
  seconds = time.monotonic() - killed
  print(f'\nthe launcher exited {seconds:.2f} s after process 1 was killed')
  assert proc.returncode == 128 + signal.SIGKILL, ''.join(lines) + stderr  # the first to fail
  assert seconds < timeout, seconds
  assert 'Traceback' not in stderr and 'Fatal Python error' not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith('error: ')]
  assert (
      len(errors) == 1
      and errors[0].startswith('error: process 0 of 2: a collective failed (')
      and errors[0].endswith(
          'another process died, stopped or fell behind; stopped (a silent process is declared dead after '
          f'distributed_timeout_seconds={timeout})'
      )
  ), stderr


def _one_line(stderr, expected):
  """Asserts that ``stderr`` holds the one ``error:`` line ``expected`` and no native pages."""
  for pages in ('Traceback', 'Fatal Python error', 'Check failure'):
    assert pages not in stderr, stderr
  assert [line for line in stderr.splitlines() if line.startswith('error: ')] == [expected], stderr


def _the_other_stops(proc, reads, *, killed, timeout, when):
  """Waits for ``proc``, whose process ``killed`` the hook killed ``when``: the launcher ends
  with the kill's status, within the documented bound, the other process having said one line."""
  _, stderr = proc.communicate(timeout=600)
  seconds = time.time() - float((reads / 'signalled').read_text())
  print(f'\nthe launcher exited {seconds:.2f} s after process {killed} was killed {when}')
  assert proc.returncode == 128 + signal.SIGKILL, stderr
  assert seconds < timeout + 15, seconds  # the documented bound
  _one_line(
      stderr,
      f'error: process {1 - killed} of 2: process {killed} gave no sign of life for {timeout} s '
      '(distributed_timeout_seconds): it died or hangs; stopped',
  )


def test_process_0_killed_during_start_up_stops_the_other_in_one_line(setup):
  """Process 0, which starts the coordination service, is killed while it opens the data: process
  1 exits 1 with one line within distributed_timeout_seconds + 1 s, and nothing is written
  (before, process 1 aborted at once: SIGABRT, pages of native logs, having lost the service)."""
  timeout, name = 5, 'killed_starting'
  proc = _local(
      setup, name, 2, 2, f'--config.distributed_timeout_seconds={timeout}', SIGNAL='0:start:SIGKILL'
  )
  _the_other_stops(
      proc, setup['root'] / f'{name}_reads', killed=0, timeout=timeout, when='during start-up'
  )
  assert not (setup['root'] / name).exists()


def test_a_bad_timeout_exits_2_in_one_line(setup, tmp_path):
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'skd_jax.main',
          *_args(setup, tmp_path / 'wd'),
          '--config.distributed_timeout_seconds=0',
      ],
      cwd=REPO,
      env=_env(setup, tmp_path / 'reads'),
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      'error: distributed_timeout_seconds: expected an integer >= 1, got 0'
  )
  assert not (tmp_path / 'wd').exists()


def _files(workdir):
  return {
      os.path.join(d, name): os.stat(os.path.join(d, name)).st_mtime_ns
      for d, _, names in os.walk(workdir)
      for name in names
  }


def test_a_process_killed_while_saving_stops_the_other_and_the_rerun_resumes(setup):
  """Three launches on one workdir.

  1. Process 1 is killed once it has started saving the last checkpoint. Process 0, waiting for
     it at orbax's commit barrier, sees its heartbeats stop and exits 1 with one line within
     distributed_timeout_seconds + 1 s (before: JAX aborted it, SIGABRT with pages of native
     logs).
  2. A SIGTERM to process 1 during start-up stops both processes before they compile, with
     status 0, each saying who was signalled, and nothing written (before: they trained, and
     process 1 said "a signal to another process").
  3. The rerun resumes from the last committed checkpoint and finishes.
  """
  timeout, name, last = 5, 'killed_saving', TOTAL - STEPS_PER_EPOCH
  workdir, reads = setup['root'] / name, setup['root'] / f'{name}_reads'
  proc = _local(
      setup,
      name,
      2,
      2,
      f'--config.distributed_timeout_seconds={timeout}',
      SIGNAL=f'1:{TOTAL}:SIGKILL',
  )
  _the_other_stops(proc, reads, killed=1, timeout=timeout, when='while saving')
  with ocp.CheckpointManager(workdir / 'checkpoints') as manager:
    assert manager.latest_step() == last

  before = _files(workdir)
  stdout, stderr = _finish(_local(setup, name, 2, 2, SIGNAL='1:start:SIGTERM'))
  stopped = 'during start-up: stopped before training; nothing was written'
  assert f'SIGTERM {stopped}' in stderr and f'SIGTERM to process 1 {stopped}' in stderr, stderr
  assert 'Compiled' not in stderr and not stdout, stderr
  assert _files(workdir) == before

  _, stderr = _finish(_local(setup, name, 2, 2))
  assert f'Resumed from the checkpoint at step {last}.' in stderr, stderr
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == TOTAL
