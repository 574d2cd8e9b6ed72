"""Start-up: the seed is no part of a compiled program, the command line keeps its programs in a
persistent compilation cache, and a finished run reprints its summary without building its job."""

import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
from skd_jax import compilation_cache
from skd_jax import train

sys.path.insert(0, os.path.join(os.path.dirname(__file__), 'golden'))
import make_seed_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cache_entries():
  return sorted(os.listdir(jax.config.jax_compilation_cache_dir))


def test_a_run_with_another_seed_compiles_nothing_new():
  """The suite's cache (tests/conftest.py) keeps every program: a second seed adds no entry."""
  c = runs.config('baseline', num_epochs=1)
  with tfds.testing.mock_data(num_examples=runs.NUM_EXAMPLES):
    jobs = [train.build_job(c, jax.devices()[:1])]
    before = _cache_entries()
    c.seed = 11
    jobs.append(train.build_job(c, jax.devices()[:1]))
  assert _cache_entries() == before
  # The same programs, another key: other parameters, other batches.
  a, b = (jax.tree.leaves(job.state.params) for job in jobs)
  assert not all(np.array_equal(x, y) for x, y in zip(a, b))
  batches = [job.source.batch(jax.numpy.int32(0), *job.source.step_args(0)) for job in jobs]
  assert not np.array_equal(batches[0]['main'].index, batches[1]['main'].index)


@pytest.mark.slow
def test_a_seeds_records_are_those_of_the_code_that_compiled_the_seed_in():
  """``golden/seed_metrics.json`` was written before the seed became an argument (bit-identical
  on the machine that wrote it; a tolerance for other CPUs' instruction sets). The run is
  compiled at XLA's default level, as the file's was, not at the suite's -O0 (conftest.py)."""
  with open(make_seed_metrics.PATH) as f:
    reference = json.load(f)
  flags = re.sub(r'--xla_backend_optimization_level=\S*', '', os.environ.get('XLA_FLAGS', ''))
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'records.json')
    subprocess.run(
        [sys.executable, make_seed_metrics.__file__, out],
        env={**os.environ, 'XLA_FLAGS': flags},
        check=True,
        timeout=300,
    )
    with open(out) as f:
      got = json.load(f)
  assert [(r['kind'], r['step']) for r in got] == [(r['kind'], r['step']) for r in reference]
  for new, old in zip(got, reference):
    for key, value in old.items():  # records may have gained keys since
      if isinstance(value, str):
        assert new[key] == value, key
      else:
        np.testing.assert_allclose(new[key], value, rtol=1e-6, err_msg=f'{old["step"]} {key}')


def test_the_cache_folder_is_the_flag_then_the_environment_then_jax_then_xdg(monkeypatch):
  monkeypatch.delenv(compilation_cache.ENV, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', '/xdg')
  monkeypatch.setattr(compilation_cache, '_jax_dir', lambda: None)
  assert compilation_cache.choose_dir(None) == '/xdg/skd_jax/jax'
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', '/home/someone')
  assert compilation_cache.choose_dir(None) == '/home/someone/.cache/skd_jax/jax'
  monkeypatch.setattr(compilation_cache, '_jax_dir', lambda: '/jax')
  assert compilation_cache.choose_dir(None) == '/jax'
  monkeypatch.setenv(compilation_cache.ENV, '/env')
  assert compilation_cache.choose_dir(None) == '/env'
  assert compilation_cache.choose_dir('/flag') == '/flag'
  assert compilation_cache.choose_dir('off') is None
  monkeypatch.setenv(compilation_cache.ENV, 'OFF')
  assert compilation_cache.choose_dir(None) is None
  assert compilation_cache.choose_dir('/flag') == '/flag'


@pytest.fixture
def restored_jax_config():
  names = (
      'jax_enable_compilation_cache',
      'jax_compilation_cache_dir',
      'jax_persistent_cache_min_compile_time_secs',
  )
  saved = {name: getattr(jax.config, name) for name in names}
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


def test_a_folder_that_cannot_be_written_turns_the_cache_off_with_one_warning(
    tmp_path, caplog, restored_jax_config
):
  del restored_jax_config
  (tmp_path / 'file').write_text('')
  assert compilation_cache.enable(str(tmp_path / 'file' / 'cache')) is None
  warnings = [r for r in caplog.records if r.levelname == 'WARNING']
  assert len(warnings) == 1 and 'compiling without it' in warnings[0].getMessage()
  assert '\n' not in warnings[0].getMessage()
  assert not jax.config.jax_enable_compilation_cache
  assert compilation_cache.enable(str(tmp_path / 'cache')) == str(tmp_path / 'cache')
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'cache')
  assert os.listdir(tmp_path / 'cache') == []  # the probe is gone


def _finished_run(tmp_path):
  workdir = tmp_path / 'run'
  c = runs.config('baseline', num_epochs=1)
  summary = runs.run(c, workdir, devices=1)
  return c, workdir, summary


def test_a_finished_run_gives_its_summary_without_building_the_job(tmp_path, monkeypatch):
  c, workdir, summary = _finished_run(tmp_path)
  with monkeypatch.context() as patch:
    patch.setattr(train, 'build_job', lambda *a, **k: pytest.fail('built the job'))
    assert train.finished_summary(c, str(workdir)) == summary
    changed = runs.config('baseline', num_epochs=1, log_every_steps=1)  # resumable: applied
    assert train.finished_summary(changed, str(workdir)) is None
    assert train.finished_summary(runs.config('baseline'), str(workdir)) is None  # refused later
  assert runs.run(c, workdir, devices=1) == summary  # what the slow path gives
  (workdir / 'summary.json').unlink()
  assert train.finished_summary(c, str(workdir)) is None


def _main(*args, cache):
  env = {
      **os.environ,
      'JAX_NUM_CPU_DEVICES': '1',
      'PYTHONPATH': REPO,
      compilation_cache.ENV: cache,
  }
  return subprocess.run(
      [sys.executable, '-m', 'skd_jax.main', *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )


@pytest.mark.slow
def test_the_command_line_caches_its_programs_and_reprints_a_finished_run(tmp_path):
  data = runs.fashion_mnist(tmp_path, 48, 16)
  args = [
      '--config=configs/baseline.py:quick',
      f'--config.data.dir={data}',
      '--config.num_epochs=1',
      '--config.batch_size=16',
      '--config.model.widths=(4, 8, 8)',
  ]
  cache = tmp_path / 'cache'
  first = _main(*args, f'--workdir={tmp_path / "b"}', '--config.seed=1', cache=str(cache))
  assert first.returncode == 0, first.stderr
  entries = sorted(os.listdir(cache))
  assert entries  # the train step, the evaluation step, the initialisation at least
  other_seed = _main(*args, f'--workdir={tmp_path / "c"}', '--config.seed=2', cache=str(cache))
  assert other_seed.returncode == 0, other_seed.stderr
  # Every program came from the cache: no program of the first run was written again under
  # another key. (A tiny one whose compile time crossed the cache's threshold may be new.)
  programs = lambda names: {name.rsplit('-', 2)[0] for name in names}
  assert not programs(set(os.listdir(cache)) - set(entries)) & programs(entries)

  # The finished run again, with a cache folder that cannot be created: one warning line.
  (tmp_path / 'file').write_text('')
  broken = str(tmp_path / 'file' / 'cache')
  again = _main(*args, f'--workdir={tmp_path / "b"}', '--config.seed=1', cache=broken)
  assert again.returncode == 0, again.stderr
  assert again.stdout == first.stdout and json.loads(again.stdout)['epochs'] == 1
  assert 'is finished' in again.stderr and 'Compiled' not in again.stderr
  warnings = [line for line in again.stderr.splitlines() if line.startswith('W')]
  assert len(warnings) == 1 and 'Compilation cache: cannot use' in warnings[0], again.stderr
