"""The package as a user installs it: the sdist and the wheel build, and the wheel alone, outside
the repository, gives the losses, the terms with their doctests, and a short training run.

The wheel goes into a fresh virtualenv (no pip) whose only other path is a ``.pth`` line naming
this interpreter's site-packages, for the dependencies: a ``.pth`` there is not read from a path
added that way, so the repository's editable install stays invisible and ``skd_jax`` can only
come from the wheel. The tests run there with the working directory outside the repository and
no PYTHONPATH. Configs are not package data: the training run passes ``configs/pskd.py`` of the
repository by path, as a user passes their own config file.
"""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import runs

import skd_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a build needs: the project's metadata files and the package, nothing else of the repo.
SOURCES = (
    'skd_jax',
    'setup.cfg',
    'pyproject.toml',
    'README.md',
    'LICENSE',
    'CHANGELOG.md',
    'MANIFEST.in',
)
# The train extra's modules: the core (losses, terms) imports none of them.
TRAIN_ONLY = (
    'orbax',
    'tensorflow_datasets',
    'tensorflow',
    'grain',
    'tensorboardX',
    'tqdm',
    'ml_collections',
    'PIL',
)

pytestmark = pytest.mark.slow

# Runs after `sys.modules[name] = None` for each name in BLOCKED: an import of one raises, and
# importlib.util.find_spec says it is absent, as in an environment without it.
_BLOCK = 'import sys\nfor _name in {blocked!r}: sys.modules[_name] = None\n'

_CORE = """
import doctest, importlib, os, pkgutil, sys
import skd_jax, skd_jax.losses, skd_jax.terms
assert skd_jax.__file__.startswith({site!r}), skd_jax.__file__
skd_jax.terms.term_classes()  # imports every term module
names = [m.name for p in (skd_jax.losses, skd_jax.terms)
         for m in pkgutil.iter_modules(p.__path__, p.__name__ + '.')]
attempted = 0
for name in ['skd_jax.losses', 'skd_jax.terms'] + names:
  module = importlib.import_module(name)
  assert module.__file__.startswith({site!r}), module.__file__
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, name
  attempted += result.attempted
print('examples', attempted)
"""


@pytest.fixture(scope='module')
def dist(tmp_path_factory):
  """``(sdist, wheel)`` paths, built from a copy of the package's sources alone."""
  source = tmp_path_factory.mktemp('source')
  for name in SOURCES:
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns('__pycache__'))
    else:
      shutil.copy2(path, source / name)
  out = tmp_path_factory.mktemp('dist')
  # No isolation: the build backend (setuptools, wheel) comes from the test extra, offline.
  subprocess.run(
      [sys.executable, '-m', 'build', '--no-isolation', '--outdir', str(out), str(source)],
      check=True,
      capture_output=True,
      timeout=300,
  )
  files = sorted(os.listdir(out))
  sdists = [str(out / f) for f in files if f.endswith('.tar.gz')]
  wheels = [str(out / f) for f in files if f.endswith('.whl')]
  assert len(sdists) == len(wheels) == 1 == len(files) - 1, files
  return sdists[0], wheels[0]


@pytest.fixture(scope='module')
def venv(dist, tmp_path_factory):
  """``(python, site_packages)`` of a virtualenv holding only the wheel."""
  root = tmp_path_factory.mktemp('venv')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(root)], check=True)
  python = os.path.join(root, 'bin', 'python')
  purelib = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True,
      capture_output=True,
      text=True,
  ).stdout.strip()
  assert purelib.startswith(str(root)), purelib
  with open(os.path.join(purelib, 'dependencies.pth'), 'w') as f:
    # Every site directory this interpreter has (venv, system, user), but not the repository.
    f.write('\n'.join(p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))))
  subprocess.run(
      [
          *(sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index'),
          *('--target', purelib, dist[1]),
      ],
      check=True,
      capture_output=True,
  )
  return python, purelib


def _run(venv_, code_or_args, cwd, blocked=(), timeout=120):
  python, _ = venv_
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  if isinstance(code_or_args, str):
    args = ['-c', _BLOCK.format(blocked=blocked) + code_or_args]
  else:
    args = code_or_args
  return subprocess.run(
      [python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_the_wheel_and_sdist_hold_every_module_the_license_and_the_version(dist):
  sdist, wheel = dist
  version = skd_jax.__version__
  assert os.path.basename(wheel).startswith(f'skd_jax-{version}-py3-none-any')
  modules = {
      os.path.relpath(os.path.join(d, f), REPO)
      for d, _, files in os.walk(os.path.join(REPO, 'skd_jax'))
      for f in files
      if f.endswith('.py')
  }
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    metadata = z.read(f'skd_jax-{version}.dist-info/METADATA').decode()
  assert modules <= names, sorted(modules - names)
  assert any(n.startswith(f'skd_jax-{version}.dist-info/') and 'LICENSE' in n for n in names)
  assert f'Version: {version}\n' in metadata
  assert 'Requires-Dist: jax<0.11,>=0.10.2\n' in metadata
  assert 'Provides-Extra: train\n' in metadata
  # The core requirements are the four libraries and numpy; the rest is behind an extra.
  core = [
      l for l in metadata.splitlines() if l.startswith('Requires-Dist:') and 'extra ==' not in l
  ]
  assert sorted(l.split()[1].split('<')[0].split('>')[0] for l in core) == [
      'chex',
      'flax',
      'jax',
      'numpy',
      'optax',
  ]
  import tarfile  # pylint: disable=g-import-not-at-top

  with tarfile.open(sdist) as t:
    members = {m.name.split('/', 1)[1] for m in t.getmembers() if '/' in m.name}
  assert {'LICENSE', 'CHANGELOG.md', 'setup.cfg', 'skd_jax/losses/__init__.py'} <= members


def test_losses_and_terms_from_the_wheel_pass_their_doctests_without_the_train_extra(
    venv, tmp_path
):
  # Every module of the train extra is made absent: the core must not import any of them.
  proc = _run(venv, _CORE.format(site=venv[1]), tmp_path, TRAIN_ONLY)
  assert proc.returncode == 0, proc.stderr
  assert int(proc.stdout.split()[-1]) > 0, proc.stdout


def test_the_trainer_without_its_extra_says_which_extra_in_one_line(venv, tmp_path):
  code = (
      "import runpy\nsys.argv = ['skd_jax.main']\n"
      "runpy.run_module('skd_jax.main', run_name='__main__')"
  )
  proc = _run(venv, code, tmp_path, ('grain', 'tensorflow_datasets'))
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "error: the trainer needs skd_jax's train extra (grain, tensorflow_datasets missing): "
      "pip install 'skd_jax[train]'"
  ]


def test_a_short_training_run_from_the_wheel(venv, tmp_path):
  data = tmp_path / 'fmnist'
  data.mkdir()
  workdir = tmp_path / 'wd'
  proc = _run(
      venv,
      [
          '-c',
          'import runpy, skd_jax.train\n'
          f'assert skd_jax.train.__file__.startswith({venv[1]!r}), skd_jax.train.__file__\n'
          "runpy.run_module('skd_jax.main', run_name='__main__', alter_sys=True)",
          f'--config={os.path.join(REPO, "configs", "pskd.py")}:quick',
          f'--workdir={workdir}',
          f'--config.data.dir={runs.fashion_mnist(data, 64, 32)}',
          '--config.batch_size=16',
          '--config.num_epochs=1',
      ],
      tmp_path,
      timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  evals = runs.records(workdir, 'eval')
  assert [r['epoch'] for r in evals] == [1], evals
  assert (workdir / 'summary.json').exists()
