"""The persistent compilation cache of command-line runs: compiled programs kept across processes.

``python -m skd_jax.main`` turns JAX's persistent compilation cache on (:func:`enable`), so a run
whose programs were compiled before, by any earlier run of the same config and shapes on this
machine (the seed is not part of any program), loads them from disk instead of compiling them:
start-up drops from tens of seconds to a few. Library use (``skd_jax.train.train_and_evaluate``
from Python) leaves JAX's settings as the caller made them.

The folder, first match wins:

1. ``--compilation_cache=DIR`` on the command line (``--compilation_cache=off`` turns it off);
2. the environment variable ``SKD_JAX_COMPILATION_CACHE`` (a folder, or ``off``);
3. JAX's own ``JAX_COMPILATION_CACHE_DIR`` (``jax_compilation_cache_dir``), when set;
4. ``$XDG_CACHE_HOME/skd_jax/jax``, by default ``~/.cache/skd_jax/jax``.

Programs that take at least :data:`MIN_COMPILE_SECONDS` to compile are kept. Several processes
may share the folder (JAX 0.10.2, without a size limit, takes no lock): JAX writes an entry under
its key once, from process 0 of a multi-process run only, and never rewrites it; an entry it
cannot read (one being written by another process, or one cut short when its writer was killed)
is compiled again, with a warning. A cut-short entry stays, so its program is compiled (and
warned about) in every run until the folder is deleted. A cached program is the program the
compiler would build, so results do not depend on the cache. Nothing is ever removed: delete the
folder to free the space (a few MB per config). A folder that cannot be created or written is
reported in one warning line and the run compiles without a cache.
"""

import logging
import os
import tempfile

import jax

log = logging.getLogger(__name__)

ENV = 'SKD_JAX_COMPILATION_CACHE'
OFF = 'off'
# Programs faster to compile than this are not worth a file (reading one costs milliseconds).
MIN_COMPILE_SECONDS = 0.1


def default_dir() -> str:
  """``$XDG_CACHE_HOME/skd_jax/jax``, or ``~/.cache/skd_jax/jax`` when XDG_CACHE_HOME is unset."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'skd_jax', 'jax')


def _jax_dir() -> str | None:
  return jax.config.jax_compilation_cache_dir  # JAX_COMPILATION_CACHE_DIR, if set


def choose_dir(flag: str | None) -> str | None:
  """The cache folder for the ``--compilation_cache`` value ``flag`` (None: not given), or None
  for no cache (see the module docstring for the order)."""
  for value in (flag, os.environ.get(ENV)):
    if value is not None:
      return None if value.strip().lower() in (OFF, '') else os.path.expanduser(value)
  return _jax_dir() or default_dir()


def _unusable(path: str) -> str | None:
  """Why ``path`` cannot hold the cache, or None when it can (creates it)."""
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix='.skd_jax-probe-')
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable(flag: str | None = None) -> str | None:
  """Turns the persistent compilation cache on in the folder :func:`choose_dir` gives, or off.

  Call before the first compilation. Returns the folder in use, or None.
  """
  path = choose_dir(flag)
  if path is not None:
    problem = _unusable(path)
    if problem:
      log.warning(
          'Compilation cache: cannot use %s (%s); compiling without it (--compilation_cache=DIR '
          'or %s=DIR chooses another folder, =off turns this warning off).',
          path,
          problem,
          ENV,
      )
      path = None
  if path is None:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return path
