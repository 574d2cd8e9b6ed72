"""The files a run keeps in its workdir, written by process 0 only.

* ``config.json`` -- the run's configuration. A workdir belongs to one configuration: resuming
  with a different one is refused rather than mixing two runs' files.
* ``metrics.jsonl`` -- one JSON object per log step (``"kind": "train"``) and per evaluation
  (``"kind": "eval"``). On resume, lines past the restored checkpoint are dropped, so the file
  reads as one uninterrupted run.
* ``summary.json`` -- final metrics, written once at the end.
* ``checkpoints/`` -- orbax checkpoints (see ``skd_jax.train``).
* ``model/`` -- the trained inference model, an orbax checkpoint of ``{'params', 'batch_stats'}``
  of the backbone alone (no training-only heads, no optimizer or loss state), written at the end.

Whole files are replaced atomically (write to a temporary file, then rename), so an interrupted
run never leaves a half-written one.
"""

import json
import os
import tempfile
from typing import Any, Iterator

import ml_collections

from skd_jax.errors import ConfigError


def _atomic_write(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.tmp-')
  with os.fdopen(fd, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


class Workdir:
  """Reads and writes a run's files; methods are no-ops on processes other than 0."""

  def __init__(self, path: str, config: ml_collections.ConfigDict, *, is_main: bool):
    self.path = os.path.abspath(path)
    self.is_main = is_main
    self.checkpoints = os.path.join(self.path, 'checkpoints')
    self.model = os.path.join(self.path, 'model')
    self._metrics = os.path.join(self.path, 'metrics.jsonl')
    config_json = config.to_json_best_effort(sort_keys=True, indent=2)
    config_path = os.path.join(self.path, 'config.json')
    if os.path.exists(config_path):
      with open(config_path) as f:
        if json.load(f) != json.loads(config_json):
          raise ConfigError(
              f'workdir: {self.path} holds a run with a different config.json; '
              'use a new --workdir, or the same config to resume'
          )
    elif is_main:
      os.makedirs(self.path, exist_ok=True)
      _atomic_write(config_path, config_json + '\n')

  def records(self) -> Iterator[dict[str, Any]]:
    if os.path.exists(self._metrics):
      with open(self._metrics) as f:
        yield from (json.loads(line) for line in f if line.strip())

  def truncate_metrics(self, step: int) -> None:
    """Drops records written after ``step`` (by a run that stopped before checkpointing them)."""
    if self.is_main and os.path.exists(self._metrics):
      kept = [r for r in self.records() if r['step'] <= step]
      _atomic_write(self._metrics, ''.join(json.dumps(r) + '\n' for r in kept))

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
