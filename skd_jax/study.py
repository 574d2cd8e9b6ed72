r"""Studies: several methods times several seeds, each an ordinary run, in one command.

  python -m skd_jax.study --study=configs/studies/quick.py --workdir=DIR \
      [--entries=a,b] [--seeds=0,1] [--parallel=K] [--config.KEY=VALUE ...]
  python -m skd_jax.study report DIR

A study is a config file (``configs/studies/NAME.py``) whose ``get_config()`` returns an
``ml_collections.ConfigDict`` with

* ``entries``: a list of dicts, in the order the results list them, each with ``name`` (a folder
  name), ``config`` (a run config, ``path[:arg]`` as for ``skd_jax.main``), optionally
  ``overrides`` (``{'dotted.key': value}``, applied to that entry's runs) and ``teacher`` (the
  name of another entry whose run of the same seed is this entry's frozen teacher, passed as
  ``teacher.workdir``; it runs first);
* ``seeds``: the seeds every entry runs with (``config.seed``);
* ``baseline``: the name of the entry the report takes differences against.

Every run is ``python -m skd_jax.main`` in its own process, in ``DIR/<entry>/seed<k>``, with the
entry's config and overrides, ``--config.seed=k``, its teacher's workdir, then the study
command's own ``--config.KEY=VALUE`` (applied to every run), so each has every guarantee of a
single run (resume, refusal of a changed config, clean stop on a signal). Its output goes to
``DIR/<entry>/seed<k>.log``; the study prints one line per run started and finished, with the
ETA of the whole study, to stderr.

Rerunning the command continues the study: a run with a ``summary.json`` (written when a run
finishes) is skipped, an interrupted one resumes, a failed one is reported in one line (its exit
status and its last output line) without stopping the others, and the runs taught by a failed
run are skipped. ``DIR/study.json`` records each entry's resolved configuration (with the
command's ``--config`` overrides, without the seed and the teacher's workdir); a rerun that
changes an entry which already has runs in DIR is refused, naming the entries and keys, unless
only keys that change no result differ (``data.dir``, ``log_every_steps``, ... : the keys a
single run may change on resume, ``optim.*`` excepted). Adding entries or seeds is allowed.

``DIR/study.json`` (what ``skd_jax.study_report`` reads besides the workdirs)::

  {"study": "configs/studies/quick.py", "seeds": [0, 1, 2], "baseline": "baseline",
   "config_overrides": ["--config.num_epochs=1"],   # the study command's, applied to every run
   "entries": {"baseline": {"config": "/abs/configs/baseline.py:quick", "overrides": [...],
                            "teacher": null, "run_config": {"num_epochs": 1, ...}}, ...}}

``entries`` is in the study file's order, followed by entries the file no longer has but whose
runs DIR keeps; ``seeds`` are every seed recorded so far. A run is finished when
``DIR/<entry>/seed<k>/summary.json`` exists.

SIGTERM, SIGINT and SIGHUP are passed on to the running runs, which save a checkpoint and exit;
the study then starts no more runs and exits 0; rerun the same command to continue.

``--parallel=K`` runs K runs at a time, each its own process. On a CPU the study splits this
machine's cores between them (each process is pinned to its own share, with
``os.sched_setaffinity``; XLA sizes its thread pools to the cores it may use, and the command
line makes one CPU device per core of the share); with fewer cores than K they share all of them. XLA's CPU reductions split their work by thread count, so a
run's numbers depend on its share: runs under the same K on the same machine agree bit for bit,
under another K up to float rounding. Accelerators are not split: K processes would share them.

Exit status: 0 every selected run finished, or a signal stopped the study; 1 a run failed or
was skipped for its failed teacher, or the report failed; 2 invalid input (one line naming the
flag, the file or the field; nothing written).

At the end, and with ``report DIR``, ``skd_jax.study_report.write_report(DIR)`` writes the
results (tables, plots) from the workdirs alone.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_ENTRY_FIELDS = ('name', 'config', 'overrides', 'teacher')
# Set by the study itself, per run: refused as overrides.
_OWN_KEYS = ('seed', 'teacher.workdir')
_POLL_SECONDS = 0.2

USAGE = """\
usage: python -m skd_jax.study --study=configs/studies/NAME.py[:ARG] --workdir=DIR
           [--entries=a,b] [--seeds=0,1] [--parallel=K] [--report=true|false]
           [--config.KEY=VALUE ...]
       python -m skd_jax.study report DIR

Trains every entry of a study for every seed, each run an ordinary `python -m skd_jax.main` run in
DIR/<entry>/seed<k> (its output in DIR/<entry>/seed<k>.log), then writes the report. Rerunning the
same command continues: finished runs are skipped, interrupted ones resume.

  --study=FILE[:ARG]  the study: a config file whose get_config() gives `entries` (a list of
                      dicts with name, config, optional overrides and teacher), `seeds` and
                      `baseline` (see configs/studies/quick.py)
  --workdir=DIR       where the runs, DIR/study.json and the report are written
  --entries=a,b       run only these entries (and the entries that teach them)
  --seeds=0,1         run only these of the study's seeds
  --parallel=K        K runs at a time, each a process (on a CPU each gets its share of the
                      cores); default 1
  --report=false      do not write the report at the end
  --config.KEY=VALUE  applied to every run, after the entry's own overrides (e.g.
                      --config.num_epochs=1 --config.data.dir=SMALL to try a study quickly)

`report DIR` rewrites the report of the study in DIR from its workdirs (skd_jax.study_report).

SIGTERM/SIGINT/SIGHUP stop the running runs cleanly (each saves a checkpoint); rerun to continue.
Exit status: 0 all selected runs finished, or a signal stopped the study; 1 a run failed (or was
skipped because its teacher failed) or the report failed; 2 invalid input (one line, nothing
written).
"""


class BadInput(Exception):
  """Invalid input: one line naming the flag, file or field; the study writes nothing."""


# ---------------------------------------------------------------------------------------------
# The study file
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Entry:
  """One method of a study: a run config, its overrides, its teacher entry.

  Attributes:
    name: the entry's name, the folder of its runs.
    config: the run config, ``path[:arg]`` (the path as ``skd_jax.main`` gets it: absolute).
    values: the study file's overrides, ``{'dotted.key': value}``.
    teacher: the name of the entry that teaches this one, or None.
    resolved: the flattened configuration of its runs, without the seed and the teacher's
      workdir (with the study command's ``--config`` overrides).
  """

  name: str
  config: str
  values: dict[str, Any]
  teacher: str | None
  resolved: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def overrides(self) -> list[str]:
    """The overrides as ``--config.KEY=VALUE`` arguments."""
    return [f'--config.{k}={_format_value(v)}' for k, v in self.values.items()]


@dataclasses.dataclass
class Study:
  """A study file, checked: its entries by name (in the file's order), seeds and baseline."""

  entries: dict[str, Entry]  # in the study file's order
  seeds: list[int]
  baseline: str


def _repo() -> str:
  return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _find(path: str) -> str | None:
  """``path`` as an absolute path: relative to the current directory, else to the repository."""
  for candidate in (path, os.path.join(_repo(), path)):
    if os.path.isfile(candidate):
      return os.path.abspath(candidate)
  return None


def _last_line(text: str) -> str:
  """The last non-empty line of ``text``, without absl's prefix (``W1206 09:48:18 1 f.py:2] ``)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return re.sub(r'^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ', '', lines[-1]) if lines else ''


def _load_study_file(spec: str):
  path, _, arg = spec.partition(':')
  found = _find(path)
  if found is None:
    raise BadInput(f'--study: {path} does not exist')
  try:
    module_spec = importlib.util.spec_from_file_location('_skd_jax_study', found)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # pylint: disable=broad-except  # any error of the file is bad input
    raise BadInput(f'--study: cannot load {path} ({type(e).__name__}: {_last_line(e)})') from None


def _format_value(value) -> str:
  """A Python value as ``--config.KEY=`` text that ml_collections parses back to it."""
  return value if isinstance(value, str) else repr(value)


def _flatten(mapping, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in mapping.items():
    if hasattr(value, 'items'):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _entries(study, where: str) -> list[Entry]:
  raw = study.get('entries') if hasattr(study, 'get') else None
  if not isinstance(raw, (list, tuple)) or not raw:
    raise BadInput(f'{where}: entries: expected a non-empty list of dicts (name, config, ...)')
  entries = []
  for i, item in enumerate(raw):
    if not hasattr(item, 'items'):
      raise BadInput(f'{where}: entries[{i}]: expected a dict, got {item!r}')
    item = dict(item.items())
    name = item.get('name')
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
      raise BadInput(
          f'{where}: entries[{i}].name: expected a folder name (letters, digits, _ . -), got '
          f'{name!r}'
      )
    unknown = sorted(set(item) - set(_ENTRY_FIELDS))
    if unknown:
      raise BadInput(
          f'{where}: entries[{i}] ({name}): unknown field {unknown[0]!r}; expected '
          f'{", ".join(_ENTRY_FIELDS)}'
      )
    config = item.get('config')
    if not isinstance(config, str) or not config:
      raise BadInput(f'{where}: {name}.config: expected a run config path[:arg], got {config!r}')
    path, colon, arg = config.partition(':')
    found = _find(path)
    if found is None:
      raise BadInput(f'{where}: {name}.config: {path} does not exist')
    overrides = item.get('overrides') or {}
    if not hasattr(overrides, 'items'):
      raise BadInput(f'{where}: {name}.overrides: expected a dict of keys to values')
    values = _flatten(overrides)
    for key in values:
      if key in _OWN_KEYS:
        raise BadInput(f'{where}: {name}.overrides: {key} is set by the study, per run')
    teacher = item.get('teacher')
    if teacher is not None and not isinstance(teacher, str):
      raise BadInput(f'{where}: {name}.teacher: expected the name of another entry')
    entries.append(Entry(name, found + colon + arg, values, teacher))
  return entries


def _check_teachers(entries: dict[str, Entry], where: str) -> None:
  for entry in entries.values():
    if entry.teacher is not None and entry.teacher not in entries:
      raise BadInput(
          f'{where}: {entry.name}.teacher: unknown entry {entry.teacher!r}; expected one of '
          f'{", ".join(entries)}'
      )
  for entry in entries.values():
    chain, current = [entry.name], entry
    while current.teacher is not None:
      if current.teacher in chain:
        cycle = ' -> '.join(chain[chain.index(current.teacher) :] + [current.teacher])
        raise BadInput(f'{where}: {entry.name}.teacher: a cycle of teachers ({cycle})')
      chain.append(current.teacher)
      current = entries[current.teacher]


def _seeds(value, where: str) -> list[int]:
  ok = isinstance(value, (list, tuple)) and value
  ok = ok and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)
  if not ok or len(set(value)) != len(value):
    raise BadInput(f'{where}: expected a non-empty list of distinct integers >= 0, got {value!r}')
  return list(value)


def load_study(spec: str) -> Study:
  """Reads and checks a study file (``path[:arg]``); raises BadInput naming the field."""
  study = _load_study_file(spec)
  where = spec.partition(':')[0]
  entries = {}
  for entry in _entries(study, where):
    if entry.name in entries:
      raise BadInput(f'{where}: entries: the name {entry.name!r} appears twice')
    entries[entry.name] = entry
  _check_teachers(entries, where)
  seeds = _seeds(study.get('seeds'), f'{where}: seeds')
  baseline = study.get('baseline')
  if baseline not in entries:
    raise BadInput(f'{where}: baseline: expected the name of an entry, got {baseline!r}')
  return Study(entries, seeds, baseline)


def _unknown_key(entry: Entry, argv: list[str]) -> str:
  """Names the first ``--config.KEY`` of ``argv`` that ``entry``'s config does not define."""
  path, _, arg = entry.config.partition(':')
  module_spec = importlib.util.spec_from_file_location('_skd_jax_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  known = _flatten(module.get_config(arg or None))
  for a in argv:
    key = re.match(r'--config\.([\w.]+)', a)
    if key and key.group(1) not in known:
      where = (
          " (the study command's --config.KEY apply to every entry)"
          if a not in entry.overrides
          else ''
      )
      return (
          f'{entry.name}: --config.{key.group(1)}: unknown key in {os.path.basename(path)}{where}'
      )
  return f'{entry.name}: --config: unknown key'


def resolve(entry: Entry, global_args: list[str]) -> dict[str, Any]:
  """The flattened configuration of ``entry``'s runs, as ``skd_jax.main`` will parse it, without
  the seed and the teacher's workdir; raises BadInput for an unknown key or a bad value."""
  # pylint: disable=g-import-not-at-top  # the runs import these themselves; --help stays quick
  from absl import flags
  from ml_collections import config_flags

  # pylint: enable=g-import-not-at-top
  argv = ['skd_jax.main', f'--config={entry.config}', *entry.overrides, *global_args]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=values, sys_argv=argv)
  try:
    values(argv)
    config = values.config
    config.keys()
  except (KeyError, AttributeError):  # how ml_collections reports an unknown --config.KEY
    raise BadInput(_unknown_key(entry, argv)) from None
  except Exception as e:  # pylint: disable=broad-except  # a bad value: one line
    raise BadInput(f'{entry.name}: {_last_line(e) or type(e).__name__}') from None
  resolved = _flatten(json.loads(config.to_json_best_effort()))
  for key, value in entry.values.items():  # e.g. a string given for a tuple
    if json.loads(json.dumps(value)) != resolved.get(key):
      raise BadInput(
          f'{entry.name}.overrides: {key}: {value!r} reads back as {resolved.get(key)!r}'
      )
  for key in _OWN_KEYS:
    resolved.pop(key, None)
  return resolved


# ---------------------------------------------------------------------------------------------
# study.json: what the runs in DIR were trained with
# ---------------------------------------------------------------------------------------------


def _free_keys() -> list[str]:
  """Keys whose change alters no finished run: those a single run may change on resume, but
  the optimiser's."""
  from skd_jax import config_lib  # pylint: disable=g-import-not-at-top

  return [k for k in config_lib.RESUMABLE if not k.startswith('optim.')]


def _is_free(key: str, free: list[str]) -> bool:
  return any(key == k or (k.endswith('.*') and key.startswith(k[:-1])) for k in free)


def _recorded(run_config: dict[str, Any], key: str) -> Any:
  """``run_config``'s value of ``key``. A key it lacks was added by a newer skd_jax and has its
  default, which does what the older version did, unless the user names it, e.g. a setting of a
  loss term that ``run_config`` does not use (None: no such key; ``config_lib.recorded``)."""
  from skd_jax import config_lib  # pylint: disable=g-import-not-at-top

  value = config_lib.recorded(run_config, key)
  return None if value is config_lib.MISSING else value


def _has_runs(workdir: str, name: str) -> bool:
  folder = os.path.join(workdir, name)
  if not os.path.isdir(folder):
    return False
  return any(
      re.fullmatch(r'seed\d+', d) and os.path.exists(os.path.join(folder, d, 'config.json'))
      for d in os.listdir(folder)
  )


def _record(study: Study, spec: str, global_args: list[str]) -> dict[str, Any]:
  return {
      'study': spec,
      'seeds': study.seeds,
      'baseline': study.baseline,
      'config_overrides': global_args,
      'entries': {
          e.name: {
              'config': e.config,
              'overrides': e.overrides,
              'teacher': e.teacher,
              'run_config': e.resolved,
          }
          for e in study.entries.values()
      },
  }


def check_changes(workdir: str, record: dict[str, Any]) -> dict[str, Any]:
  """The study record to write: ``record`` merged into ``DIR/study.json``'s.

  Raises BadInput when an entry that has runs in ``workdir`` is recorded with another teacher or
  another configuration (outside the keys that change no result), naming the entries and keys.
  """
  file = os.path.join(workdir, 'study.json')
  if not os.path.exists(file):
    return record
  try:
    with open(file) as f:
      saved = json.load(f)
    saved_entries = dict(saved['entries'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise BadInput(
        f'--workdir: {file} is damaged ({type(e).__name__}); restore it or use a new --workdir'
    ) from None
  free = _free_keys()
  changed = []
  for name, now in record['entries'].items():
    before = saved_entries.get(name)
    if before is None or not _has_runs(workdir, name):
      continue
    old, new = before.get('run_config', {}), now['run_config']
    keys = sorted(k for k in old.keys() | new.keys() if _recorded(old, k) != _recorded(new, k))
    keys = [k for k in keys if not _is_free(k, free)]
    if before.get('teacher') != now['teacher']:
      keys.insert(0, f'teacher ({before.get("teacher")!r} -> {now["teacher"]!r})')
    if keys:
      shown = [
          k if k.startswith('teacher') else f'{k} ({_recorded(old, k)!r} -> {_recorded(new, k)!r})'
          for k in keys[:3]
      ]
      more = f' and {len(keys) - 3} more' if len(keys) > 3 else ''
      changed.append(f'{name}: {", ".join(shown)}{more}')
  if changed:
    raise BadInput(
        f'--study: changes entries that already have runs in {workdir}: {"; ".join(changed)}; '
        'restore them, give the changed entry a new name, or use a new --workdir'
    )
  merged = dict(record)
  # The study file's order, then entries it no longer has (their runs are still in DIR).
  merged['entries'] = {**record['entries'], **saved_entries, **record['entries']}
  merged['seeds'] = sorted(set(saved.get('seeds', [])) | set(record['seeds']))
  return merged


def _write_json(file: str, value) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), prefix='.tmp-')
  with os.fdopen(fd, 'w') as f:
    json.dump(value, f, indent=2, sort_keys=False)
    f.write('\n')
  os.chmod(tmp, 0o644)
  os.replace(tmp, file)


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """One entry and seed: its workdir, log and state."""

  entry: Entry
  seed: int
  workdir: str
  teacher: 'Run | None' = None
  state: str = 'pending'  # pending, running, done, failed, skipped, stopped
  process: subprocess.Popen | None = None
  started: float = 0.0
  slot: int = 0
  log_offset: int = 0

  @property
  def name(self) -> str:
    return f'{self.entry.name}/seed{self.seed}'

  @property
  def log(self) -> str:
    return f'{self.workdir}.log'

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'summary.json'))

  def args(self, global_args: list[str]) -> list[str]:
    teacher = [f'--config.teacher.workdir={self.teacher.workdir}'] if self.teacher else []
    return [
        f'--config={self.entry.config}',
        f'--workdir={self.workdir}',
        *self.entry.overrides,
        f'--config.seed={self.seed}',
        *teacher,
        *global_args,
    ]


def _plan(study: Study, names: list[str], seeds: list[int], workdir: str) -> list[Run]:
  """The runs of ``names`` (and of the entries teaching them) for ``seeds``, each after its
  teacher: seed by seed, in the study's order."""
  wanted, stack = set(), list(names)
  while stack:
    name = stack.pop()
    if name not in wanted:
      wanted.add(name)
      if study.entries[name].teacher:
        stack.append(study.entries[name].teacher)
  order = []

  def visit(name):
    if name in order:
      return
    if study.entries[name].teacher:
      visit(study.entries[name].teacher)
    order.append(name)

  for name in study.entries:
    if name in wanted:
      visit(name)
  runs = []
  for seed in seeds:
    by_name = {}
    for name in order:
      entry = study.entries[name]
      run = Run(entry, seed, os.path.join(workdir, name, f'seed{seed}'))
      run.teacher = by_name.get(entry.teacher)
      by_name[name] = run
      runs.append(run)
  return runs


def _cpu_slots(parallel: int) -> list[set[int] | None]:
  """Each slot's share of this process's CPUs (None: no pinning).

  The shares are equal (spare cores unused): XLA's CPU reductions split their work by the
  number of threads, so a run's numbers depend on its share, which must not depend on which slot
  it happened to get.
  """
  try:
    cpus = sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return [None] * parallel
  if parallel == 1 or len(cpus) < parallel:
    return [None] * parallel
  size = len(cpus) // parallel
  return [set(cpus[i * size : (i + 1) * size]) for i in range(parallel)]


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  if seconds < 3600:
    return f'{seconds // 60} min {seconds % 60:02d} s'
  return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


class _Stop:
  """Records the first SIGTERM, SIGINT or SIGHUP and passes every one on to the running runs."""

  def __init__(self):
    self.signal: str | None = None  # the first signal's name
    self.signum: int | None = None
    self.processes: list[subprocess.Popen] = []
    self._previous = {}

  def install(self) -> None:
    self._previous = {sig: signal.signal(sig, self.handle) for sig in _SIGNALS}

  def restore(self) -> None:
    """Gives the signals back to their previous handlers (before the report: Ctrl-C ends it)."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def handle(self, signum, frame):
    del frame
    self.signal = self.signal or signal.Signals(signum).name
    self.signum = self.signum or signum
    for process in self.processes:
      if process.poll() is None:
        try:
          process.send_signal(signum)
        except ProcessLookupError:  # it has just exited
          pass

  def add(self, process: subprocess.Popen) -> None:
    self.processes.append(process)
    if self.signum is not None:  # it came while the process started: pass it on too
      process.send_signal(self.signum)


class _Runner:
  """Starts runs, at most ``parallel`` at a time, each after its teacher; passes signals on."""

  def __init__(self, runs: list[Run], global_args: list[str], parallel: int, stop: _Stop):
    self.stop = stop
    self.runs = runs
    self.global_args = global_args
    self.parallel = parallel
    self.slots = _cpu_slots(parallel)
    self.walls: list[float] = []
    self.total = sum(r.state == 'pending' for r in runs)
    self.count = 0

  def _eta(self) -> str:
    left = sum(r.state in ('pending', 'running') for r in self.runs)
    if not left:
      return 'done'
    if not self.walls:
      return 'ETA after the first run'
    per_run = sum(self.walls) / len(self.walls)
    return f'ETA {_duration(per_run * left / self.parallel)}'

  def _start(self, run: Run) -> None:
    used = {r.slot for r in self.runs if r.state == 'running'}
    run.slot = next(i for i in range(self.parallel) if i not in used)
    cpus = self.slots[run.slot]
    os.makedirs(os.path.dirname(run.log), exist_ok=True)
    args = run.args(self.global_args)
    with open(run.log, 'a') as log:
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
      log.write(f'# {stamp}: {sys.executable} -m skd_jax.main {" ".join(args)}\n')
      run.log_offset = log.tell()
      env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
      run.process = subprocess.Popen(
          [sys.executable, '-m', 'skd_jax.main', *args],
          stdin=subprocess.DEVNULL,
          stdout=log,
          stderr=subprocess.STDOUT,
          env=env,
          preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
      )
    run.state, run.started = 'running', time.time()
    self.stop.add(run.process)
    self.count += 1
    where = f', CPUs {min(cpus)}-{max(cpus)}' if cpus else ''
    _say(f'started {run.name} ({self.count}/{self.total}{where}); log: {run.log}')

  def _last_output(self, run: Run) -> str:
    try:
      with open(run.log, 'rb') as f:
        f.seek(run.log_offset)
        return _last_line(f.read().decode(errors='replace')) or '(no output)'
    except OSError:
      return '(no log)'

  def _finish(self, run: Run, status: int) -> None:
    wall = time.time() - run.started
    if run.finished and status == 0:
      run.state = 'done'
      self.walls.append(wall)
      _say(f'finished {run.name} in {_duration(wall)}; {self._eta()}')
    elif status == 0 or (self.stop.signal and status < 0):
      # A signal stopped it (status 0: after saving a checkpoint, or during start-up).
      run.state = 'stopped'
      _say(f'stopped {run.name} after {_duration(wall)}: {self._last_output(run)}')
    else:
      run.state = 'failed'
      _say(
          f'FAILED {run.name} after {_duration(wall)}: exit status {status}: '
          f'{self._last_output(run)} (log: {run.log})'
      )

  def _ready(self) -> list[Run]:
    ready = []
    for run in self.runs:
      if run.state != 'pending':
        continue
      teacher = run.teacher
      if teacher is not None and teacher.state in ('failed', 'skipped', 'stopped'):
        run.state = 'skipped'
        _say(f'skipped {run.name}: its teacher {teacher.name} {teacher.state}')
      elif teacher is None or teacher.state == 'done':
        ready.append(run)
    return ready

  def run(self) -> None:
    """Runs until every run is done, failed or skipped, or a signal stopped the running ones."""
    while True:
      if self.stop.signal is None:
        busy = sum(r.state == 'running' for r in self.runs)
        for run in self._ready()[: self.parallel - busy]:
          self._start(run)
      running = [r for r in self.runs if r.state == 'running']
      if not running:
        break
      for run in running:
        status = run.process.poll()
        if status is not None:
          self._finish(run, status)
      time.sleep(_POLL_SECONDS)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def write_report(workdir: str) -> int | None:
  """Writes the study's report with ``skd_jax.study_report`` and prints its paths.

  Returns:
    0 when written, 1 when the report failed, None when this skd_jax has no
    ``skd_jax.study_report`` (said in one line).
  """
  try:
    study_report = importlib.import_module('skd_jax.study_report')
  except ModuleNotFoundError as e:
    if e.name != 'skd_jax.study_report':
      raise
    print(
        'report: skd_jax.study_report is not part of this skd_jax; no report written',
        file=sys.stderr,
    )
    return None
  try:
    paths = study_report.write_report(workdir)
  except Exception as e:  # pylint: disable=broad-except  # one line, the runs are intact
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), '')
    print(f'report: failed ({type(e).__name__}: {first})', file=sys.stderr)
    return 1
  for path in paths:
    print(path)
  return 0


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    raise BadInput(message)


def _parse(argv: list[str]):
  parser = _Parser(prog='python -m skd_jax.study', add_help=False, allow_abbrev=False)
  parser.add_argument('--study')
  parser.add_argument('--workdir')
  parser.add_argument('--entries')
  parser.add_argument('--seeds')
  parser.add_argument('--parallel', default='1')
  parser.add_argument('--report', default='true')
  flags_, rest = parser.parse_known_args(argv)
  global_args = []
  for arg in rest:
    match = re.fullmatch(r'--config\.([\w.]+)=(.*)', arg, re.DOTALL)
    if not match:
      raise BadInput(f'unexpected argument {arg!r}; see --help')
    if match.group(1) in _OWN_KEYS:
      raise BadInput(f'--config.{match.group(1)}: set by the study, per run (use --seeds)')
    global_args.append(arg)
  if not flags_.study:
    raise BadInput('--study: expected a study file, e.g. --study=configs/studies/quick.py')
  if not flags_.workdir:
    raise BadInput('--workdir: expected a directory for the study')
  if not re.fullmatch(r'[1-9]\d*', flags_.parallel):
    raise BadInput(f'--parallel: expected an integer >= 1, got {flags_.parallel!r}')
  if flags_.report.lower() not in ('true', 'false', '1', '0'):
    raise BadInput(f'--report: expected true or false, got {flags_.report!r}')
  return flags_, global_args


def _select(study: Study, flags_) -> tuple[list[str], list[int]]:
  names = list(study.entries)
  if flags_.entries is not None:
    names = [n for n in flags_.entries.split(',') if n]
    unknown = [n for n in names if n not in study.entries]
    if unknown or not names:
      raise BadInput(
          f'--entries: unknown entry {unknown[0] if unknown else "(none given)"!r}; expected '
          f'names from {", ".join(study.entries)}'
      )
  seeds = study.seeds
  if flags_.seeds is not None:
    try:
      seeds = [int(s) for s in flags_.seeds.split(',')]
    except ValueError:
      raise BadInput(
          f'--seeds: expected integers, e.g. --seeds=0,1, got {flags_.seeds!r}'
      ) from None
    outside = [s for s in seeds if s not in study.seeds]
    if outside or len(set(seeds)) != len(seeds):
      raise BadInput(
          f'--seeds: expected distinct seeds of the study ({", ".join(map(str, study.seeds))}), '
          f'got {flags_.seeds!r}'
      )
  return names, seeds


def _say(message: str) -> None:
  print(f'study: {message}', file=sys.stderr, flush=True)


def run_study(argv: list[str], stop: _Stop) -> int:
  """Runs the study the flags ``argv`` describe; returns the exit status.

  ``stop`` has recorded the signals since start-up; it passes them on to the runs.
  """
  flags_, global_args = _parse(argv)
  study = load_study(flags_.study)
  names, seeds = _select(study, flags_)
  if '://' in flags_.workdir:
    raise BadInput(f'--workdir: {flags_.workdir}: expected a local directory')
  workdir = os.path.abspath(flags_.workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise BadInput(f'--workdir: {workdir} is a file; expected a directory')
  for entry in study.entries.values():
    entry.resolved = resolve(entry, global_args)
  record = check_changes(workdir, _record(study, flags_.study, global_args))
  if stop.signal:
    _say(f'{stop.signal} during start-up: stopped before any run; nothing was written')
    return 0

  # From here on DIR is written.
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, 'study.json'), record)
  runs = _plan(study, names, seeds, workdir)
  extra = sorted({r.entry.name for r in runs} - set(names))
  if extra:
    _say(f'also runs {", ".join(extra)}: teacher(s) of the selected entries')
  finished = [r for r in runs if r.finished]
  for run in finished:
    run.state = 'done'
  parallel = int(flags_.parallel)
  _say(
      f'{len(runs)} run(s) ({len(finished)} already finished) of {len(study.entries)} entries in '
      f'{workdir}, {parallel} at a time'
  )
  start = time.time()
  _Runner(runs, global_args, parallel, stop).run()
  counts = {s: sum(r.state == s for r in runs) for s in ('done', 'failed', 'skipped', 'stopped')}
  summary = (
      f'{counts["done"]} of {len(runs)} runs finished, {counts["failed"]} failed, '
      f'{counts["skipped"]} skipped, in {_duration(time.time() - start)}'
  )
  if stop.signal:
    _say(
        f'{stop.signal}: stopped; {summary}; {len(runs) - sum(counts.values())} not started, '
        f'{counts["stopped"]} stopped (a run stopped in training saved a checkpoint); rerun the '
        'same command to continue'
    )
    return 0
  if counts['stopped']:  # a signal to a run alone
    summary += f', {counts["stopped"]} stopped by a signal of their own (rerun to continue)'
  _say(summary)
  status = 1 if counts['failed'] or counts['skipped'] or counts['stopped'] else 0
  if flags_.report.lower() in ('true', '1'):
    stop.restore()
    status = max(status, write_report(workdir) or 0)  # a missing report module is said only
  return status


def main(argv: list[str]) -> int:
  """``python -m skd_jax.study ...``: runs a study, or ``report DIR``; returns the exit status.

  While a study runs, SIGTERM, SIGINT and SIGHUP are recorded (and passed on to the runs)
  instead of ending it; the previous handlers are restored for its report and at the end.
  """
  if any(a in ('-h', '--help', '-help', '--helpfull', '-?') for a in argv):
    print(USAGE, end='')
    return 0
  stop = _Stop()
  try:
    if argv[:1] == ['report']:
      if len(argv) != 2:
        raise BadInput('report: expected one directory: python -m skd_jax.study report DIR')
      if not os.path.isdir(argv[1]):
        raise BadInput(f'report: {argv[1]} is not a directory')
      status = write_report(argv[1])
      return 1 if status is None else status
    stop.install()
    return run_study(argv, stop)
  except BadInput as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    stop.restore()


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
