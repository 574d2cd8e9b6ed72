"""The files a run keeps in its workdir, written by process 0 only.

* ``config.json`` -- the run's current configuration. A workdir belongs to one run: resuming with
  a configuration that differs in a key outside ``config_lib.RESUMABLE`` is refused, naming the
  keys.
* ``data.json`` -- the identity of the training set (``skd_jax.data.identity``: source, name,
  split, number of examples, SHA-256 of the labels trained on; with ``data.train_examples`` or
  ``data.label_noise``, the subset and the noise, ``skd_jax.data.selection``). Resuming on
  another training set is refused; the same one found in another ``data.dir`` is not. A workdir written before ``data.json``
  existed records it when it is resumed.
* ``config_changes.jsonl`` -- one line per resume that changed resumable keys:
  ``{"step": S, "changes": {"optim.lr": [old, new], ...}}``, S being the step from which the new
  values apply.
* ``metrics.jsonl`` -- one JSON object per train record and per evaluation; every key is described
  in ``README.md`` (section "The workdir"). When a run starts, lines past the step it starts from
  are dropped (all of them when it starts from scratch), and so are lines that do not parse (a
  line torn by a killed process), so the file reads as one uninterrupted run.
* ``tensorboard/`` -- TensorBoard event files of the records of ``metrics.jsonl``
  (``skd_jax.events``), kept equal to it: appended to with every record, and rewritten from the
  records kept when a run starts, into a new file that replaces the older ones, so a resumed run
  shows each step once.
* ``summary.json`` -- final metrics, written once at the end.
* ``checkpoints/`` -- orbax checkpoints (``skd_jax.checkpoints``); ``broken_checkpoints/`` holds
  damaged ones (unreadable metadata, failed to restore or to match their fingerprint), moved
  aside for inspection.
* ``model/`` -- the trained inference model (``skd_jax.export``), written at the end.

``config.json`` and ``data.json`` that do not hold a JSON object (empty, truncated, overwritten) are
refused in one line naming the file, before anything is loaded or written.

Whole files are replaced atomically, so an interrupted run never leaves a half-written one: on a
local disk a temporary file is renamed over the old one; in a bucket one upload replaces the
object whole. Files get ordinary permissions (0666 minus the umask).

**Where.** A workdir is a local path or a Google Cloud Storage URL, ``gs://BUCKET/PATH`` (the
filesystems orbax writes checkpoints to). Every file is reached through ``etils.epath``, as orbax
reaches its own (gs:// through gcsfs, installed by the ``gcs`` extra), and :func:`path` never
turns a URL into a local path. :func:`check_path` asks the bucket once, without retrying, before
anything is loaded or written, so a bucket that cannot be reached, or reached without
credentials, fails in one line. Object stores cannot append: there ``metrics.jsonl`` and the event
file are rewritten whole at each record.
"""

import importlib
import json
import logging
import os
import re
import tempfile
import time
from typing import Any

from etils import epath
import ml_collections

from skd_jax import config_lib
from skd_jax import events
from skd_jax.errors import ConfigError, first_line

log = logging.getLogger(__name__)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


_REQUEST_SECONDS = 10  # the bucket check's one request


def path(p: str | os.PathLike) -> epath.Path:
  """``p`` as an ``etils.epath`` path: a URL as given, a local path made absolute (for orbax)."""
  text = os.fspath(p)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def is_remote(p: str | os.PathLike) -> bool:
  """Whether ``p`` is a URL (``gs://...``) rather than a local path."""
  return '://' in os.fspath(p)


def _atomic_write(target: epath.Path, text: str | bytes) -> None:
  if is_remote(target):  # one upload replaces an object whole; a rename would copy it
    if isinstance(text, bytes):
      target.write_bytes(text)
    else:
      target.write_text(text)
    return
  fd, tmp = tempfile.mkstemp(dir=target.parent, prefix='.tmp-')
  try:
    with os.fdopen(fd, 'wb' if isinstance(text, bytes) else 'w') as f:
      f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _cause(error: BaseException) -> str:
  """The error's first line, or the OS error deep inside it (``[Errno 111] Connection refused``)."""
  text = first_line(error) or type(error).__name__
  os_error = re.search(r'\[Errno -?\d+\] [^\'")\]]+', text)
  if os_error:
    return os_error.group(0).strip()
  return text if len(text) <= 200 else text[:197] + '...'


def check_remote(p: str | os.PathLike, field: str) -> None:
  """Raises ConfigError unless ``p`` is a local path or a ``gs://`` URL of a bucket this machine
  reaches with its credentials.

  One request (``buckets.get``, which orbax needs too), without retries, bounded by
  ``_REQUEST_SECONDS``: offline it fails in seconds, where gcsfs would retry for most of a minute.
  ``field`` names the setting in the message.
  """
  text = os.fspath(p)
  if not is_remote(text):
    return
  scheme, _, rest = text.partition('://')
  bucket = rest.split('/', 1)[0]
  if scheme != 'gs' or not bucket:
    raise ConfigError(f'{field}: {text}: expected a local path or gs://BUCKET/PATH')
  # pylint: disable=g-import-not-at-top
  try:
    from google.api_core import exceptions as api_errors
    import google.auth.exceptions as auth_errors
    from google.cloud import storage
    import requests

    importlib.import_module('gcsfs')  # epath's gs:// filesystem
  except ImportError:
    raise ConfigError(
        f"{field}: {text}: gs:// needs gcsfs; expected `pip install -e '.[gcs]'` in the repository"
    ) from None
  # pylint: enable=g-import-not-at-top
  try:
    storage.Client().get_bucket(bucket, timeout=_REQUEST_SECONDS, retry=None)
  except auth_errors.DefaultCredentialsError:
    raise ConfigError(
        f'{field}: {text}: no Google Cloud credentials found; expected `gcloud auth '
        'application-default login`, GOOGLE_APPLICATION_CREDENTIALS or a Cloud VM'
    ) from None
  except api_errors.NotFound:
    raise ConfigError(f'{field}: {text}: the bucket {bucket} does not exist') from None
  except (api_errors.Forbidden, api_errors.Unauthorized) as e:
    raise ConfigError(
        f'{field}: {text}: these credentials may not use the bucket {bucket} ({_cause(e)})'
    ) from None
  except (auth_errors.GoogleAuthError, api_errors.GoogleAPIError, requests.RequestException) as e:
    raise ConfigError(
        f'{field}: {text}: cannot reach the bucket {bucket} ({_cause(e)}); expected a '
        'connection to Google Cloud Storage'
    ) from None


def check_path(p: str | os.PathLike) -> None:
  """Raises ConfigError unless ``p`` is a directory, or can be created, and is writable.

  Checked before anything is loaded or written, so a bad ``--workdir`` fails at once. A ``gs://``
  workdir is checked by :func:`check_remote` and must not be an object.
  """
  check_remote(p, 'workdir')
  target = path(p)
  if is_remote(target):
    if target.exists() and not target.is_dir():
      raise ConfigError(f'workdir: {target} is a file; expected a directory or a path to create')
    return
  path_ = os.fspath(target)
  if os.path.exists(path_) and not os.path.isdir(path_):
    raise ConfigError(f'workdir: {path_} is a file; expected a directory or a path to create')
  existing = path_
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(
        f'workdir: {path_} lies under the file {existing}; expected a directory or a path to create'
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


def read_records(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``WORKDIR/metrics.jsonl`` ([] without one; lines that do not parse are skipped
  with a warning), read without a configuration: for reports on finished or copied workdirs."""
  return Workdir._read(path(workdir) / 'metrics.jsonl')


def _read_object(file: epath.Path, expected: str) -> dict[str, Any] | None:
  """The JSON object in ``file`` (None if there is no file); ConfigError if it holds none."""
  if not file.exists():
    return None
  try:
    text = file.read_text()
    value = json.loads(text)
  except UnicodeDecodeError:
    problem = 'not text'
  except json.JSONDecodeError as e:
    problem = 'empty' if not text.strip() else f'not JSON (line {e.lineno}: {e.msg})'
  else:
    if isinstance(value, dict):
      return value
    problem = f'a JSON {type(value).__name__}'
  raise ConfigError(
      f'workdir: {file} is {problem}; expected {expected} as a JSON object written by skd_jax; '
      'restore the file or use a new --workdir'
  )


def _describe(data: dict[str, Any]) -> str:
  """``2,000 examples of fashion_mnist 'train' (labels sha256 1f2e3d4c5b6a)``."""
  count = data.get('examples')
  count = f'{count:,}' if isinstance(count, int) else repr(count)
  labels = str(data.get('labels_sha256'))[:12]
  return f'{count} examples of {data.get("name")} {data.get("split")!r} (labels sha256 {labels})'


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
  non-resumable configuration, or whose ``config.json`` or ``data.json`` is damaged;
  :meth:`check_data` refuses another training set. :meth:`begin` writes.
  """

  def __init__(self, path_: str | os.PathLike, config: ml_collections.ConfigDict, *, is_main: bool):
    self.path = path(path_)
    self.is_main = is_main
    self.checkpoints = self.path / 'checkpoints'
    self.broken_checkpoints = self.path / 'broken_checkpoints'
    self.model = self.path / 'model'
    self.tensorboard = self.path / events.FOLDER
    self._events = None  # the event file being written, once begun
    self._events_bytes = b''  # what it holds, for filesystems that cannot append
    self._config_path = self.path / 'config.json'
    self._data_path = self.path / 'data.json'
    self._changes_path = self.path / 'config_changes.jsonl'
    self._metrics = self.path / 'metrics.jsonl'
    self._metrics_lines = []  # what metrics.jsonl holds, for filesystems that cannot append
    self._config_json = config.to_json_best_effort(sort_keys=True, indent=2)
    self.changes = {}  # key -> [value in config.json, value now], resumable keys only
    now = config_lib.flatten(json.loads(self._config_json))
    self._data_dir = now.get('data.dir')
    saved = _read_object(self._config_path, "the run's configuration")
    self._saved_data = _read_object(self._data_path, 'the identity of the training set')
    self._data = None  # the identity of the training set now, once checked
    if saved is not None:
      saved = config_lib.flatten(saved)
      # Keys newer than the run's skd_jax are no change at their defaults; keys the user names (a
      # loss term added, even at its default settings) are (see config_lib.recorded).
      differ = sorted(
          k
          for k in saved.keys() | now.keys()
          if config_lib.recorded(saved, k) != now.get(k, config_lib.MISSING)
      )
      refused = [k for k in differ if not config_lib.resumable(k)]
      if refused:
        shown = ', '.join(f'{k} ({saved.get(k)!r} -> {now.get(k)!r})' for k in refused[:4])
        more = f' and {len(refused) - 4} more' if len(refused) > 4 else ''
        raise ConfigError(
            f'workdir: {self.path} holds a run with a different config: {shown}{more}; only '
            f'{", ".join(config_lib.RESUMABLE)} (but not {", ".join(config_lib.NOT_RESUMABLE)}) '
            'may change on resume; use a new --workdir'
        )
      self.changes = {k: [saved.get(k), now.get(k)] for k in differ}

  def check_data(self, data: dict[str, Any]) -> None:
    """Refuses (ConfigError) a training set other than the one the run in this workdir trained on.

    ``data`` is the identity of the training set now (``skd_jax.data.identity``); :meth:`begin`
    records it. Only reads.
    """
    if self._saved_data is not None and self._saved_data != data:
      where = self._data_dir or 'the default data.dir'
      raise ConfigError(
          f'data: {self.path} holds a run trained on {_describe(self._saved_data)}; this config '
          f'reads {_describe(data)} from {where}; resume with the same training set or use a new '
          '--workdir'
      )
    self._data = data

  def begin(self, step: int) -> None:
    """Starts writing at ``step``: records config changes and the training set (once checked by
    :meth:`check_data`), drops metrics past ``step``."""
    if not self.is_main:
      return
    self.path.mkdir(parents=True, exist_ok=True)
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
    if self._data is not None:
      _atomic_write(self._data_path, json.dumps(self._data, indent=2, sort_keys=True) + '\n')
    records = [r for r in self.records() if r['step'] <= step]
    if self._metrics.exists():
      self._metrics_lines = [json.dumps(r) + '\n' for r in records]
      _atomic_write(self._metrics, ''.join(self._metrics_lines))
    self._begin_events(records)

  def _begin_events(self, records: list[dict[str, Any]]) -> None:
    """Writes the kept ``records`` to a new event file and removes the older ones.

    TensorBoard reads a folder's files in name order, so the new file's number follows theirs. A
    run killed before the removal leaves them for the next start to remove.
    """
    self.tensorboard.mkdir(parents=True, exist_ok=True)
    # A bucket has no empty folders: there the folder exists once it holds a file.
    found = self.tensorboard.iterdir() if self.tensorboard.exists() else []
    older = [p for p in found if 'tfevents' in p.name]
    serials = [events.serial(p.name) for p in older]
    number = max([time.time_ns()] + [s + 1 for s in serials if s is not None])
    self._events = self.tensorboard / events.file_name(number)
    now = time.time()
    self._events_bytes = events.header(now) + b''.join(events.encode(r, now) for r in records)
    _atomic_write(self._events, self._events_bytes)
    for p in older:
      p.unlink()

  @staticmethod
  def _read(file: epath.Path) -> list[dict[str, Any]]:
    if not file.exists():
      return []
    return _parse(file.read_text().splitlines(), file.name)

  def records(self) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` (lines that do not parse are skipped)."""
    return self._read(self._metrics)

  def log(self, record: dict[str, Any]) -> None:
    """Appends ``record`` to ``metrics.jsonl`` and its scalars to the event file (after
    :meth:`begin`)."""
    if not self.is_main:
      return
    line = json.dumps(record) + '\n'
    event = events.encode(record, time.time()) if self._events is not None else b''
    if is_remote(self._metrics):  # an object cannot be appended to: write it whole
      self._metrics_lines.append(line)
      _atomic_write(self._metrics, ''.join(self._metrics_lines))
      if event:
        self._events_bytes += event
        _atomic_write(self._events, self._events_bytes)
    else:
      with self._metrics.open('a') as f:
        f.write(line)
      if event:
        with self._events.open('ab') as f:
          f.write(event)

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.is_main:
      _atomic_write(
          self.path / 'summary.json', json.dumps(summary, indent=2, sort_keys=True) + '\n'
      )
