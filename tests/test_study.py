"""The study runner (``python -m skd_jax.study``) on small Fashion-MNIST: teachers run first, a
rerun skips finished runs, a SIGTERM then a rerun equals an uninterrupted study, a failing entry
does not stop the others, a changed study and bad input are refused with nothing written."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import runs
from skd_jax import study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STUDY = """
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.entries = [
      dict(name='baseline', config='configs/baseline.py:quick'),
      dict(name='kd', config='configs/teacher_kd.py:quick', teacher='baseline'),
      dict(name='broken', config='configs/baseline.py:quick', overrides={'optim.lr': %s}),
  ]
  c.seeds = [0, 1]
  c.baseline = 'baseline'
  return c
"""


def _write(path, text):
  path.write_text(text)
  return str(path)


def _study(*args, cache, report=False):
  """Starts ``python -m skd_jax.study`` on tiny runs (2 epochs of 20 steps, widths 4/8/8), which
  share the persistent compilation ``cache`` (conftest.py turns it off for the suite's other
  command-line runs)."""
  env = {**os.environ, 'PYTHONPATH': REPO, 'SKD_JAX_COMPILATION_CACHE': cache}
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return subprocess.Popen(
      [
          sys.executable,
          '-m',
          'skd_jax.study',
          *args,
          '--config.num_epochs=2',
          '--config.model.widths=(4, 8, 8)',
          '--config.batch_size=8',
          '--config.eval_batch_size=16',
          '--config.log_every_steps=1',
          f'--report={str(report).lower()}',
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )


@pytest.fixture(scope='module')
def studies(tmp_path_factory):
  """Study A (every entry, 2 at a time) stopped by SIGTERM during its first run then rerun to the
  end; beside it, study B: the same study's ``baseline``, seed 0 only, never interrupted."""
  tmp = tmp_path_factory.mktemp('study')
  data = runs.fashion_mnist(tmp_path_factory.mktemp('fmnist'), 160, 32)
  file = _write(tmp / 'study.py', STUDY % "float('inf')")
  cache = str(tmp_path_factory.mktemp('xla_cache'))
  a, b = tmp / 'a', tmp / 'b'
  common = (f'--study={file}', f'--config.data.dir={data}')
  # --parallel=2 gives each run half of the cores (one of this machine's 2), which decides how
  # XLA splits its reductions: the reference must get the same share to be bit-identical.
  reference = _study(
      *common, f'--workdir={b}', '--entries=baseline', '--seeds=0', '--parallel=2', cache=cache
  )
  first = _study(*common, f'--workdir={a}', '--parallel=2', '--entries=baseline,kd', cache=cache)
  metrics = a / 'baseline' / 'seed0' / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline:
    assert first.poll() is None, first.communicate()
    time.sleep(0.05)
  first.send_signal(signal.SIGTERM)
  interrupted = first.communicate(timeout=300) + (first.returncode,)
  stopped_with_checkpoint = (a / 'baseline' / 'seed0' / 'checkpoints').is_dir() and not (
      a / 'baseline' / 'seed0' / 'summary.json'
  ).exists()
  rerun = _study(*common, f'--workdir={a}', '--parallel=2', cache=cache, report=True)
  rerun = rerun.communicate(timeout=600) + (rerun.returncode,)
  reference = reference.communicate(timeout=600) + (reference.returncode,)
  return dict(
      a=a,
      b=b,
      file=file,
      data=data,
      cache=cache,
      interrupted=interrupted,
      stopped_with_checkpoint=stopped_with_checkpoint,
      rerun=rerun,
      reference=reference,
  )


@pytest.mark.slow
def test_a_signal_stops_the_study_cleanly_and_the_rerun_equals_an_uninterrupted_study(studies):
  _, stderr, status = studies['interrupted']
  assert status == 0, stderr
  assert 'SIGTERM: stopped' in stderr and 'rerun the same command to continue' in stderr, stderr
  assert studies['stopped_with_checkpoint'], stderr
  assert 'Traceback' not in stderr
  _, stderr, status = studies['reference']
  assert status == 0, stderr
  resumed, uninterrupted = studies['a'] / 'baseline' / 'seed0', studies['b'] / 'baseline' / 'seed0'
  assert runs.without_time(runs.records(resumed)) == runs.without_time(runs.records(uninterrupted))
  (step, state), (step_b, state_b) = runs.restore(str(resumed)), runs.restore(str(uninterrupted))
  assert step == step_b == 40
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, state, state_b)))


@pytest.mark.slow
def test_teachers_run_first_and_a_failing_entry_does_not_stop_the_others(studies):
  stdout, stderr, status = studies['rerun']
  a = studies['a']
  assert status == 1, stderr
  # The report is written at the end all the same (skd_jax.study_report), its paths on stdout.
  assert f'{a}/results.md' in stdout.split() and (a / 'results.md').exists(), stderr
  for seed in (0, 1):
    line = next(l for l in stderr.splitlines() if f'FAILED broken/seed{seed}' in l)
    assert 'exit status 2: error: optim.lr: expected a finite number, got inf' in line
    assert f'{a}/broken/seed{seed}.log' in line
    for entry in ('baseline', 'kd'):
      assert (a / entry / f'seed{seed}' / 'summary.json').exists(), stderr
      assert (a / entry / f'seed{seed}.log').exists()
    config = json.loads((a / 'kd' / f'seed{seed}' / 'config.json').read_text())
    assert config['teacher']['workdir'] == str(a / 'baseline' / f'seed{seed}')
    assert config['seed'] == seed
    teacher_done = (a / 'baseline' / f'seed{seed}' / 'summary.json').stat().st_mtime
    assert teacher_done < (a / 'kd' / f'seed{seed}' / 'config.json').stat().st_mtime
  assert '4 of 6 runs finished, 2 failed' in stderr
  # Progress is the study's own: the runs' output is in their logs only.
  assert 'img/s' not in stderr and 'img/s' in (a / 'kd' / 'seed1.log').read_text()
  record = json.loads((a / 'study.json').read_text())
  assert record['seeds'] == [0, 1] and record['baseline'] == 'baseline'
  assert list(record['entries']) == ['baseline', 'kd', 'broken']
  assert record['entries']['kd']['teacher'] == 'baseline'
  assert record['entries']['broken']['run_config']['optim.lr'] == float('inf')
  assert record['entries']['kd']['run_config']['num_epochs'] == 2


@pytest.mark.slow
def test_a_rerun_skips_finished_runs_quickly_and_selects_entries_and_seeds(studies):
  start = time.time()
  proc = _study(
      f'--study={studies["file"]}',
      f'--workdir={studies["a"]}',
      f'--config.data.dir={studies["data"]}',
      '--entries=kd',
      cache=studies['cache'],
  )
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  assert 'also runs baseline: teacher(s) of the selected entries' in stderr
  assert '4 run(s) (4 already finished)' in stderr and 'started' not in stderr
  assert time.time() - start < 30
  # Study B selected baseline, seed 0: nothing else was run there.
  b = studies['b']
  assert sorted(os.listdir(b)) == ['baseline', 'study.json']
  assert sorted(os.listdir(b / 'baseline')) == ['seed0', 'seed0.log']


@pytest.mark.slow
def test_a_changed_entry_with_runs_is_refused_naming_it_and_nothing_is_written(studies, tmp_path):
  b = studies['b']
  before = (b / 'study.json').read_text()
  changed = STUDY.replace("'configs/baseline.py:quick')", "'configs/label_smoothing.py:quick')", 1)
  file = _write(tmp_path / 'changed.py', changed % '0.1')
  proc = _study(
      f'--study={file}',
      f'--workdir={b}',
      f'--config.data.dir={studies["data"]}',
      cache=studies['cache'],
  )
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 2, stderr
  line = stderr.strip().splitlines()[-1]
  assert line.startswith('error: --study: changes entries that already have runs in'), line
  assert 'baseline: loss.cross_entropy.weight (1.0 -> None), loss.label_smoothing.eps' in line
  assert 'broken' not in line  # changed too, but it has no runs in b
  assert (b / 'study.json').read_text() == before and not (b / 'kd').exists()


def _entry(**run_config):
  return {'config': 'c.py', 'overrides': [], 'teacher': None, 'run_config': run_config}


def test_new_entries_and_seeds_and_keys_that_change_no_result_are_allowed(tmp_path):
  saved = {
      'seeds': [0],
      'baseline': 'a',
      'entries': {'a': _entry(num_epochs=2, **{'data.dir': 'x'})},
  }
  (tmp_path / 'study.json').write_text(json.dumps(saved))
  os.makedirs(tmp_path / 'a' / 'seed0')
  (tmp_path / 'a' / 'seed0' / 'config.json').write_text('{}')
  now = {
      'seeds': [0, 1],
      'baseline': 'a',
      'entries': {'a': _entry(num_epochs=2, **{'data.dir': 'y'}), 'b': _entry(num_epochs=5)},
  }
  merged = study.check_changes(str(tmp_path), now)
  assert merged['seeds'] == [0, 1] and list(merged['entries']) == ['a', 'b']
  assert merged['entries']['a']['run_config']['data.dir'] == 'y'
  # Keys a newer skd_jax added, at their defaults, change nothing (data.module, a new setting of a
  # term the entry uses); other values of them do, and so does a term the entry did not use.
  now['entries']['a'] = _entry(
      num_epochs=2, **{'data.dir': 'x', 'data.module': '', 'optim.lr': 0.1}
  )
  assert study.check_changes(str(tmp_path), now)['entries']['a']['run_config']['optim.lr'] == 0.1
  now['entries']['a'] = _entry(num_epochs=3, **{'data.dir': 'x', 'optim.lr': 0.5})
  with pytest.raises(study.BadInput, match=r'a: num_epochs \(2 -> 3\), optim.lr \(0.1 -> 0.5\);'):
    study.check_changes(str(tmp_path), now)
  saved['entries']['a']['run_config']['loss.pskd.weight'] = 1.0
  (tmp_path / 'study.json').write_text(json.dumps(saved))
  for key, value, refused in [
      ('loss.pskd.storage', 'float32', False),
      ('loss.pskd.storage', 'bfloat16', True),
      ('loss.label_smoothing.epsilon', 0.1, True),
  ]:
    now['entries']['a'] = _entry(num_epochs=2, **{'loss.pskd.weight': 1.0, key: value})
    if refused:
      with pytest.raises(study.BadInput, match=re.escape(key)):
        study.check_changes(str(tmp_path), now)
    else:
      study.check_changes(str(tmp_path), now)
  now['entries']['a'] = _entry(num_epochs=3)
  (tmp_path / 'a' / 'seed0' / 'config.json').unlink()  # no run has started: any change goes
  assert study.check_changes(str(tmp_path), now)['entries']['a']['run_config']['num_epochs'] == 3


@pytest.fixture
def bad(tmp_path):
  """Runs ``skd_jax.study.main`` in this process on a study file; returns (status, stderr)."""

  def run(capsys, *args, text=STUDY % '0.1'):
    file = _write(tmp_path / 'bad.py', text)
    status = study.main([f'--study={file}', f'--workdir={tmp_path / "dir"}', *args])
    stderr = capsys.readouterr().err
    assert not (tmp_path / 'dir').exists()
    return status, stderr.strip().splitlines()

  return run


@pytest.mark.parametrize(
    'args, text, message',
    [
        (['--entries=baseline,nope'], None, "--entries: unknown entry 'nope'"),
        (['--seeds=0,5'], None, '--seeds: expected distinct seeds of the study (0, 1)'),
        (['--seeds=0,x'], None, '--seeds: expected integers'),
        (['--parallel=0'], None, '--parallel: expected an integer >= 1'),
        (['--config.seed=3'], None, '--config.seed: set by the study, per run'),
        (['--config.nmu_epochs=3'], None, 'baseline: --config.nmu_epochs: unknown key'),
        (['--workers=2'], None, "unexpected argument '--workers=2'"),
        ([], 'def get_config(:', '--study: cannot load'),
        ([], 'def get_config():\n  return {}', 'entries: expected a non-empty list'),
        (
            [],
            STUDY.replace("teacher='baseline'", "teacher='nope'"),
            "kd.teacher: unknown entry 'nope'",
        ),
        (
            [],
            STUDY.replace(
                "config='configs/baseline.py:quick')",
                "config='configs/baseline.py:quick', " "teacher='kd')",
                1,
            ),
            'baseline.teacher: a cycle of teachers (baseline -> kd -> baseline)',
        ),
        (
            [],
            STUDY.replace('c.seeds = [0, 1]', 'c.seeds = [0, 0]'),
            'seeds: expected a non-empty list of distinct',
        ),
        (
            [],
            STUDY.replace("c.baseline = 'baseline'", "c.baseline = 'ce'"),
            "baseline: expected the name of an entry, got 'ce'",
        ),
        (
            [],
            STUDY.replace("config='configs/teacher_kd.py:quick'", "config='configs/nope.py'"),
            'kd.config: configs/nope.py does not exist',
        ),
        (
            [],
            STUDY.replace("'optim.lr': %s", "'model.widths': 'wide'"),
            "broken.overrides: model.widths: 'wide' reads back as",
        ),
    ],
)
def test_bad_input_exits_2_in_one_line_and_writes_nothing(bad, capsys, args, text, message):
  status, lines = bad(
      capsys, *args, **({'text': text % '0.1' if '%s' in text else text} if text else {})
  )
  assert status == 2 and len(lines) == 1, lines
  assert lines[0].startswith('error: ') and message in lines[0], lines


def test_report_calls_study_report_and_prints_its_paths(tmp_path, capsys, monkeypatch):
  fake = type(sys)('skd_jax.study_report')
  fake.write_report = lambda d: [os.path.join(d, 'results.md'), os.path.join(d, 'results.csv')]
  monkeypatch.setitem(sys.modules, 'skd_jax.study_report', fake)
  assert study.main(['report', str(tmp_path)]) == 0
  assert capsys.readouterr().out.split() == [f'{tmp_path}/results.md', f'{tmp_path}/results.csv']

  def broken(d):
    raise ValueError(f'{d}: no runs\nsecond line')

  fake.write_report = broken
  assert study.main(['report', str(tmp_path)]) == 1
  assert capsys.readouterr().err == f'report: failed (ValueError: {tmp_path}: no runs)\n'
  monkeypatch.setitem(sys.modules, 'skd_jax.study_report', None)  # a version without it
  assert study.main(['report', str(tmp_path)]) == 1
  assert capsys.readouterr().err.count('\n') == 1
  assert study.main(['report', str(tmp_path / 'nope')]) == 2
  assert 'is not a directory' in capsys.readouterr().err
