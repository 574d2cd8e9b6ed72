"""The processes of a multi-process run watch each other: when one ends, the others end soon after.

``jax.distributed`` alone does not bound this. Its coordination service lives in process 0, and
each client aborts its process (SIGABRT, pages of native logs) the moment it loses the service or
hears that another process missed its heartbeats; a process waiting at a barrier (an orbax save,
the preemption sync point) waits until then. :func:`initialize` changes three things:

* **The service runs in a child of process 0**, a small process that outlives process 0 by
  ``timeout + 15`` seconds, so that process 0's death is no longer an abort of everyone else.
  Process 0 shuts it down at its normal exit, as jax.distributed would the service in itself.
* **Each process beats in the service's key-value store** (every second, from a thread) and reads
  the others' beats. A process whose beat has not changed for ``timeout`` seconds, or that left
  without finishing, ends this one with one line and status 1 (``os._exit``: jax's exit handler
  would wait at a shutdown barrier for the missing process). A finished process says so and is
  no longer watched.
* **The service declares a process dead only after ``timeout + 15`` seconds** (its heartbeat
  timeout), so that the beats above speak first and no client aborts.

So, whatever the moment (a step, a save, evaluation, start-up), when one process dies every other
one exits 1 with one line within ``timeout`` + 1 seconds; sooner when a collective fails first
(the next step's, at once) or the dead process left through :func:`exit`.
"""

import atexit
import os
import signal
import subprocess
import sys
import threading
import time

import jax
from jax._src import distributed  # the client; and the service's factory, to move it to a child

from skd_jax.errors import first_line

_MARGIN = 15  # seconds the service waits beyond `timeout` (see the module docstring)
_PERIOD = 1.0  # seconds between beats
_KEY = 'skd_jax/alive/'
_DONE, _EXITED = 'done', 'exited'

# The service's process: starts the service; shuts it down when its parent (process 0) sends
# SIGUSR1 at its normal exit, or `heartbeat` seconds after the parent is gone without it. Signals
# meant for the run (a scheduler's SIGTERM to the process group) must not end it early.
_SERVICE = """
import os, signal, sys
from jaxlib import _jax
address, num_nodes, heartbeat, shutdown, parent = sys.argv[1:]
for name in ('SIGTERM', 'SIGINT', 'SIGHUP'):
  signal.signal(getattr(signal, name), signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
service = _jax.get_distributed_runtime_service(
    address, int(num_nodes), heartbeat_timeout=int(heartbeat), shutdown_timeout=int(shutdown))
while os.getppid() == int(parent):
  if signal.sigtimedwait([signal.SIGUSR1], 0.5):
    break
else:
  signal.sigtimedwait([signal.SIGUSR1], int(heartbeat))
service.shutdown()
"""


class _ServiceProcess:
  """Stands for the service jax.distributed would have started in this process (``shutdown``)."""

  def __init__(self, address, num_nodes, heartbeat_timeout, shutdown_timeout, **unused):
    del unused
    self._child = subprocess.Popen(
        [sys.executable, '-c', _SERVICE, address, str(num_nodes), str(heartbeat_timeout)]
        + [str(shutdown_timeout), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

  def shutdown(self):
    self._child.send_signal(signal.SIGUSR1)
    self._child.wait()


class _State:
  timeout = None  # seconds; None until initialize() ran with several processes
  finished = threading.Event()


_state = _State()


def initialize(coordinator_address, num_processes, process_id, timeout: int) -> None:
  """``jax.distributed.initialize`` with the watch above; ``timeout`` in seconds.

  The arguments left None are detected by jax (Cloud TPU, SLURM, ...).
  """
  factory = distributed._jax.get_distributed_runtime_service  # pylint: disable=protected-access
  distributed._jax.get_distributed_runtime_service = _ServiceProcess  # pylint: disable=protected-access
  try:
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=timeout + _MARGIN,
    )
  finally:
    distributed._jax.get_distributed_runtime_service = factory  # pylint: disable=protected-access
  if jax.process_count() == 1:
    return
  _state.timeout = timeout
  # Registered after jax's exit handler, so it runs before it (atexit runs the last one first).
  atexit.register(_leave, _EXITED)
  threading.Thread(target=_watch, name='skd_jax.peers', daemon=True).start()


def finished() -> None:
  """Tells the others that this process ended normally (finished, or stopped by a signal)."""
  _leave(_DONE)


def exit(status: int) -> None:  # pylint: disable=redefined-builtin
  """Ends this process now with ``status``, telling the others it left (which ends them).

  Returns at once in a single process (or before :func:`initialize`).
  """
  if _state.timeout is None:
    return
  _leave(_EXITED)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def _client():
  return distributed.global_state.client


def _leave(how: str) -> None:
  if _state.timeout is None or _state.finished.is_set():
    return
  _state.finished.set()
  try:
    _client().key_value_set(f'{_KEY}{jax.process_index()}', how, allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except  # the service is gone: the others see that
    pass


def _stop(message: str) -> None:
  print(
      f'error: process {jax.process_index()} of {jax.process_count()}: {message}; stopped',
      file=sys.stderr,
      flush=True,
  )
  sys.stdout.flush()
  os._exit(1)


def _watch() -> None:
  me, timeout, client = jax.process_index(), _state.timeout, _client()
  heard = {p: (None, time.monotonic()) for p in range(jax.process_count()) if p != me}
  beat = 0
  while not _state.finished.wait(0 if beat == 0 else _PERIOD):
    beat += 1
    try:
      client.key_value_set(f'{_KEY}{me}', str(beat), allow_overwrite=True)
      values = dict(client.key_value_dir_get(_KEY))
    except Exception as e:  # pylint: disable=broad-except
      _stop(f'lost the coordination service ({first_line(e)})')
    now = time.monotonic()
    for process, (last, since) in list(heard.items()):
      value = values.get(f'{_KEY}{process}')
      if value == _DONE:
        del heard[process]
      elif value == _EXITED:
        _stop(f'process {process} exited with an error')
      elif value != last:
        heard[process] = (value, now)
      elif now - since > timeout:
        _stop(
            f'process {process} gave no sign of life for {timeout} s '
            '(distributed_timeout_seconds): it died or hangs'
        )
