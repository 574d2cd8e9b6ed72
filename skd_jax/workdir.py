"""The files a run keeps in its workdir, written by process 0 only.

* ``config.json`` -- the run's current configuration. A workdir belongs to one run: resuming with
  a configuration that differs in a key outside ``config_lib.RESUMABLE`` is refused, naming the
  keys.
* ``config_changes.jsonl`` -- one line per resume that changed resumable keys:
  ``{"step": S, "changes": {"optim.lr": [old, new], ...}}``, S being the step from which the new
  values apply.
* ``metrics.jsonl`` -- one JSON object per train record and per evaluation; every key is described
  in ``README.md`` (section "The workdir"). When a run starts, lines past the step it starts from
  are dropped (all of them when it starts from scratch), and so are lines that do not parse (a
  line torn by a killed process), so the file reads as one uninterrupted run.
* ``summary.json`` -- final metrics, written once at the end.
* ``checkpoints/`` -- orbax checkpoints (``skd_jax.checkpoints``); ``broken_checkpoints/`` holds
  any that failed to restore or to match their fingerprint, moved aside for inspection.
* ``model/`` -- the trained inference model (``skd_jax.export``), written at the end.

Whole files are replaced atomically (write a temporary file, then rename), so an interrupted run
never leaves a half-written one. Files get ordinary permissions (0666 minus the umask).
"""

import json
import logging
import os
import tempfile
from typing import Any

import ml_collections

from skd_jax import config_lib
from skd_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _atomic_write(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def check_path(path: str) -> None:
  """Raises ConfigError unless ``path`` is a directory, or can be created, and is writable.

  Checked before anything is loaded or written, so a bad ``--workdir`` fails at once.
  """
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f'workdir: {path} is a file; expected a directory or a path to create')
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(
        f'workdir: {path} lies under the file {existing}; expected a directory or a path to create'
    )
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f'workdir: {existing} is not writable; expected a writable directory')


def _parse(lines: list[str], name: str) -> list[dict[str, Any]]:
  records, torn = [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      torn += 1
  if torn:
    log.warning(
        '%s: dropped %d line(s) that do not parse (torn by an interrupted run).', name, torn
    )
  return records


def _compose(changes: list[dict[str, list]]) -> dict[str, list]:
  """Several successive ``{key: [old, new]}`` records as one; keys that came back are dropped."""
  composed = {}
  for change in changes:
    for key, (old, new) in change.items():
      composed[key] = [composed[key][0] if key in composed else old, new]
  return {k: v for k, v in composed.items() if v[0] != v[1]}


class Workdir:
  """Reads and writes a run's files; writing methods are no-ops on processes other than 0.

  Construction only reads: it refuses (ConfigError) a workdir that holds a run with a different,
  non-resumable configuration. :meth:`begin` writes.
  """

  def __init__(self, path: str, config: ml_collections.ConfigDict, *, is_main: bool):
    self.path = os.path.abspath(path)
    self.is_main = is_main
    self.checkpoints = os.path.join(self.path, 'checkpoints')
    self.broken_checkpoints = os.path.join(self.path, 'broken_checkpoints')
    self.model = os.path.join(self.path, 'model')
    self._config_path = os.path.join(self.path, 'config.json')
    self._changes_path = os.path.join(self.path, 'config_changes.jsonl')
    self._metrics = os.path.join(self.path, 'metrics.jsonl')
    self._config_json = config.to_json_best_effort(sort_keys=True, indent=2)
    self.changes = {}  # key -> [value in config.json, value now], resumable keys only
    if os.path.exists(self._config_path):
      with open(self._config_path) as f:
        saved = config_lib.flatten(json.load(f))
      now = config_lib.flatten(json.loads(self._config_json))
      differ = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
      refused = [k for k in differ if not config_lib.resumable(k)]
      if refused:
        shown = ', '.join(f'{k} ({saved.get(k)!r} -> {now.get(k)!r})' for k in refused[:4])
        more = f' and {len(refused) - 4} more' if len(refused) > 4 else ''
        raise ConfigError(
            f'workdir: {self.path} holds a run with a different config: {shown}{more}; only '
            f'{", ".join(config_lib.RESUMABLE)} may change on resume; use a new --workdir'
        )
      self.changes = {k: [saved.get(k), now.get(k)] for k in differ}

  def begin(self, step: int) -> None:
    """Starts writing at ``step``: records config changes, drops metrics past ``step``."""
    if not self.is_main:
      return
    os.makedirs(self.path, exist_ok=True)
    history = self._read(self._changes_path)
    undone = [r['changes'] for r in history if r['step'] > step]
    changes = _compose(undone + [self.changes]) if undone or self.changes else {}
    kept = [r for r in history if r['step'] <= step]
    if changes:
      kept.append({'step': step, 'changes': changes})
      log.info('Config changes from step %d on: %s', step, changes)
    if kept != history:
      _atomic_write(self._changes_path, ''.join(json.dumps(r) + '\n' for r in kept))
    _atomic_write(self._config_path, self._config_json + '\n')
    records = self.records()
    if os.path.exists(self._metrics):
      kept = [r for r in records if r['step'] <= step]
      _atomic_write(self._metrics, ''.join(json.dumps(r) + '\n' for r in kept))

  @staticmethod
  def _read(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
      return []
    with open(path) as f:
      return _parse(f.readlines(), os.path.basename(path))

  def records(self) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (lines that do not parse are skipped)."""
    return self._read(self._metrics)

  def log(self, record: dict[str, Any]) -> None:
    if self.is_main:
      with open(self._metrics, 'a') as f:
        f.write(json.dumps(record) + '\n')

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.is_main:
      _atomic_write(
          os.path.join(self.path, 'summary.json'),
          json.dumps(summary, indent=2, sort_keys=True) + '\n',
      )
