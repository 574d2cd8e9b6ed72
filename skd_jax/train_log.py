"""What a run reports while it trains: checked train records, and its progress.

Train records are written to ``metrics.jsonl`` every ``log_every_steps`` steps counted from the
start of the run, each the mean of exactly that many steps (the run's last record may hold fewer).
Before a record is written, and before every checkpoint, the steps' measurements are fetched and
checked: a non-finite loss, gradient norm, parameter or BatchNorm statistic stops the run, naming
the first such step.
"""

import logging
import sys
import time

import jax
import numpy as np
import tqdm

log = logging.getLogger(__name__)


class Window:
  """The measurements of the steps since the last train record, and the checks on them.

  ``pending`` holds ``(step, measurements)`` pairs: device arrays until checked, Python floats
  after. They are saved with every checkpoint, so a resumed run continues the same window.
  """

  def __init__(self, pending=()):
    self.pending = [(int(step), measured) for step, measured in pending]

  def add(self, step: int, measured) -> None:
    self.pending.append((step, measured))

  def check(self) -> list:
    """Fetches the measurements and raises FloatingPointError at the first non-finite step.

    Returns a copy of the pending ``(step, measurements)`` pairs, for a checkpoint.
    """
    steps = [step for step, _ in self.pending]
    values = jax.device_get([measured for _, measured in self.pending])
    for step, m in zip(steps, values):
      if not np.isfinite(m['loss']):
        raise FloatingPointError(f'loss is {m["loss"]} at step {step}')
      if not np.isfinite(m['grad_norm']):
        raise FloatingPointError(f'gradient norm is {m["grad_norm"]} at step {step}')
      if not m['finite']:
        raise FloatingPointError(f'non-finite parameters or BatchNorm statistics at step {step}')
    # Python floats from here on, whether fresh or restored: the means then agree bit for bit.
    self.pending = [(s, {k: float(v) for k, v in m.items()}) for s, m in zip(steps, values)]
    return list(self.pending)  # orbax writes it in the background while the list grows

  def take(self) -> dict[str, float]:
    """The checked measurements' means (``finite`` aside); starts a new window."""
    measured = [m for _, m in self.check()]
    self.pending = []
    return {k: float(np.mean([m[k] for m in measured])) for k in measured[0] if k != 'finite'}


class Progress:
  """A progress bar on a terminal; elsewhere (a log file, SLURM) one log line per train record."""

  def __init__(self, config, start: int, total: int, steps_per_epoch: int):
    self.total, self.start, self.spe, self.config = total, start, steps_per_epoch, config
    self.tty = jax.process_index() == 0 and sys.stderr.isatty()
    self.bar = tqdm.tqdm(
        total=total, initial=start, unit='step', dynamic_ncols=True, disable=not self.tty
    )
    self.started = time.perf_counter()

  def update(self, done: int, record: dict[str, float] | None) -> None:
    self.bar.update()
    if done % self.spe == 0:
      self.bar.set_description(f'epoch {done // self.spe}/{self.config.num_epochs}', refresh=False)
    if record is None or jax.process_index() != 0:
      return
    if self.tty:
      self.bar.set_postfix(loss=f'{record["loss"]:.4f}', top1=f'{record["top1"]:.1f}')
      return
    rate = (done - self.start) / (time.perf_counter() - self.started)
    log.info(
        'step %d/%d (epoch %.2f): loss %.4f, train top-1 %.1f%%, %.0f img/s, ETA %s',
        done,
        self.total,
        done / self.spe,
        record['loss'],
        record['top1'],
        rate * self.config.batch_size,
        time.strftime('%H:%M:%S', time.gmtime((self.total - done) / rate)),
    )

  def close(self):
    self.bar.close()
