"""Signals become a request to stop cleanly, and every process of a run stops at the same step.

SIGTERM (schedulers, preemption), SIGINT (Ctrl-C) and SIGHUP (a closed terminal) do not kill the
process. :func:`install` replaces their handlers with one that only records the signal; the
trainer asks :func:`reached` at every step boundary and, once it says yes, saves a checkpoint and
exits. Before the train loop (data loading, compilation) the trainer asks
:func:`stop_before_training` and stops without writing anything.

With several processes (``jax.distributed``) every process must stop at the same step, or the
others block forever in the next collective. JAX's preemption service does that agreement: its
native SIGTERM handler tells the coordination service, which picks the first step every process
can still reach, and ``multihost_utils.reached_preemption_sync_point(step)`` turns true there on
all of them. It only listens to SIGTERM; so :func:`join_processes` puts our handler in front of
it: ours records the signal, whichever it is, and passes it on to JAX's as a SIGTERM. Each
process so knows whether it was signalled itself, and the service stops every process. Before
the train loop, :func:`stop_before_training` asks every process through the coordination
service's key-value store whether it was signalled, so that all of them stop there together,
having written nothing.

This module imports only the standard library at import time, so the command line can install
the handlers before the slow imports of JAX and TensorFlow Datasets.
"""

import ctypes
import signal

from skd_jax.errors import ConfigError

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_AGREE_MS = 24 * 3600 * 1000  # a process that died meanwhile ends this one sooner (skd_jax.peers)


class _Sigaction(ctypes.Structure):
  """Linux's ``struct sigaction``, to read and restore JAX's native SIGTERM handler."""

  _fields_ = [
      ('handler', ctypes.c_void_p),
      ('mask', ctypes.c_ulong * 16),
      ('flags', ctypes.c_int),
      ('restorer', ctypes.c_void_p),
  ]


class _State:
  signal: str | None = None  # the first signal received, by name
  previous: dict | None = None  # the handlers install() replaced; None when not installed
  multi_process = False
  native = None  # JAX's SIGTERM handler, as (its sigaction, a callable), once multi_process
  agreements = 0  # how many times stop_before_training() asked the other processes


_state = _State()


def _handle(signum, frame):
  del frame
  _state.signal = _state.signal or signal.Signals(signum).name
  if _state.multi_process:
    _state.native[1](signal.SIGTERM)  # to JAX's preemption service, which tells every process


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
    signal.signal(sig, handler)
  if _state.multi_process:  # SIGTERM goes back to JAX's preemption service
    ctypes.CDLL(None).sigaction(signal.SIGTERM, ctypes.byref(_state.native[0]), None)
  _state.previous, _state.signal, _state.multi_process = None, None, False


def join_processes() -> None:
  """Switches to the multi-process protocol when ``jax.distributed`` runs several processes.

  Call after ``jax.distributed.initialize`` (which installs JAX's native SIGTERM handler). A signal
  that arrived before is passed on now.
  """
  import jax  # pylint: disable=g-import-not-at-top  # keep this module's import light

  if jax.process_count() == 1 or _state.multi_process:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  if distributed.global_state.preemption_sync_manager is None:  # then SIGTERM is still ours
    raise ConfigError(
        'jax_enable_preemption_service: is off; several processes stop together through it, '
        'expected it on (the default)'
    )
  action = _Sigaction()
  if ctypes.CDLL(None).sigaction(signal.SIGTERM, None, ctypes.byref(action)) != 0:
    raise OSError("cannot read the SIGTERM handler of JAX's preemption service")
  _state.native = (action, ctypes.CFUNCTYPE(None, ctypes.c_int)(action.handler))
  _state.multi_process = True
  signal.signal(signal.SIGTERM, _handle)
  if _state.signal is not None:
    _state.native[1](signal.SIGTERM)


def received() -> str | None:
  """The name of the first signal this process received (e.g. ``'SIGINT'``), or None."""
  return _state.signal


def stop_before_training() -> str | None:
  """What to stop for before the train loop starts, or None.

  The name of the signal this process received; with several processes, which all must stop or
  go on together, also ``'SIGTERM to process 1'`` when another process received one. Every
  process must call it at the same points.
  """
  if not _state.multi_process:
    return _state.signal
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  _state.agreements += 1
  key = f'skd_jax/start/{_state.agreements}/'
  client.key_value_set(f'{key}{jax.process_index()}', _state.signal or '')
  signals = [
      client.blocking_key_value_get(f'{key}{p}', _AGREE_MS) for p in range(jax.process_count())
  ]
  if signals[jax.process_index()]:
    return signals[jax.process_index()]
  return next((f'{name} to process {p}' for p, name in enumerate(signals) if name), None)


def reached(step: int) -> bool:
  """Whether the run should save and stop before training step ``step`` (called every step)."""
  if not _state.multi_process:
    return _state.signal is not None
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return multihost_utils.reached_preemption_sync_point(step)
