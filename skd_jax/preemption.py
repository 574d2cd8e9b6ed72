"""Signals become a request to stop cleanly, and every process of a run stops at the same step.

SIGTERM (schedulers, preemption), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) do not kill the
process. :func:`install` replaces their handlers with one that only records the signal; the
trainer asks :func:`reached` at every step boundary and, once it says yes, saves a checkpoint and
exits. Before the train loop (data loading, compilation) the trainer asks
:func:`stop_before_training` and, in a single process, stops without writing anything.

With several processes (``jax.distributed``) every process must stop at the same step, or the
others block forever in the next collective. JAX's preemption service does that agreement: its
native SIGTERM handler tells the coordination service, which picks the first step every process
can still reach, and ``multihost_utils.reached_preemption_sync_point(step)`` turns true there on
all of them. It only listens to SIGTERM, so in a multi-process run our handler forwards SIGINT
and SIGHUP to the process itself as SIGTERM; the service then stops every process, whichever one
was signalled and whatever the signal.

This module imports only the standard library at import time, so the command line can install
the handlers before the slow imports of JAX and TensorFlow Datasets.
"""

import os
import signal

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _State:
  signal: str | None = None  # the first signal received, by name
  previous: dict | None = None  # the handlers install() replaced; None when not installed
  multi_process = False


_state = _State()


def _handle(signum, frame):
  del frame
  _state.signal = _state.signal or signal.Signals(signum).name
  if _state.multi_process and signum != signal.SIGTERM:
    os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service, which tells every process


def install() -> bool:
  """Records SIGTERM, SIGINT and SIGHUP instead of dying on them; returns False if already done."""
  if _state.previous is not None:
    return False
  _state.previous = {sig: signal.signal(sig, _handle) for sig in _SIGNALS}
  return True


def uninstall() -> None:
  """Restores the handlers :func:`install` replaced and forgets any recorded signal."""
  if _state.previous is None:
    return
  for sig, handler in _state.previous.items():
    # In a multi-process run SIGTERM belongs to JAX's preemption service (a native handler that
    # replaced ours at the OS level): leave it alone.
    if not (_state.multi_process and sig == signal.SIGTERM):
      signal.signal(sig, handler)
  _state.previous, _state.signal, _state.multi_process = None, None, False


def join_processes() -> None:
  """Switches to the multi-process protocol when ``jax.distributed`` runs several processes.

  Call after ``jax.distributed.initialize``. A signal that arrived before is passed on now.
  """
  import jax  # pylint: disable=g-import-not-at-top  # keep this module's import light

  if jax.process_count() == 1 or _state.multi_process:
    return
  _state.multi_process = True
  if _state.signal is not None:
    os.kill(os.getpid(), signal.SIGTERM)


def received() -> str | None:
  """The name of the first signal this process received (e.g. ``'SIGINT'``), or None."""
  return _state.signal


def stop_before_training() -> str | None:
  """The signal to stop for before the train loop starts, or None.

  Always None with several processes: one process leaving alone would leave the others blocked,
  so there the loop's first :func:`reached` stops them all together.
  """
  return None if _state.multi_process else _state.signal


def reached(step: int) -> bool:
  """Whether the run should save and stop before training step ``step`` (called every step)."""
  if not _state.multi_process:
    return _state.signal is not None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.reached_preemption_sync_point(step)
