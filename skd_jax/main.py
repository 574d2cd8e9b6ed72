r"""Command-line entry point.

  python -m skd_jax.main --config=configs/pskd.py:quick --workdir=/tmp/pskd \
      [--config.KEY=VALUE ...] [--generations=K] [--compilation_cache=DIR|off]

``--help`` lists the configs and every key. Exit status: 0 when training finished (the summary is
printed) or when a signal stopped it (after a checkpoint, or during start-up with nothing
written; rerun the same command to continue); 1 when it diverged (the last good checkpoint is
kept), a file could not be written or the input failed (a worker died or stalled); 2 for invalid
configuration or data, with one line naming the field and nothing written to the workdir.

Compiled programs are kept in a persistent compilation cache, by default in
``~/.cache/skd_jax/jax`` (``skd_jax.compilation_cache``: ``--compilation_cache=DIR`` or the
environment variable ``SKD_JAX_COMPILATION_CACHE`` chooses another folder, ``off`` turns it off),
so a second run of the same config starts in seconds, whatever its seed. Rerunning a finished
run prints its summary from ``summary.json`` without loading data or compiling
(``skd_jax.train.finished_summary``).

On a CPU, a single-process run splits each batch over one JAX device per CPU it may use (the
largest count dividing the batch sizes; ``skd_jax.mesh.cpu_devices``): XLA keeps several CPUs
busier that way than by spreading each operation over threads. ``JAX_NUM_CPU_DEVICES=1`` keeps
one device (any value there is used as given); GPUs and TPUs are unaffected.

In a run of several processes, when one process dies or fails at any moment (a step, a save,
evaluation, start-up; process 0 included), every other one exits 1 with one line: at once when
its next collective fails (:func:`_exit_for_lost_process`) or the failed process left through
``peers.exit``, and at the latest ``distributed_timeout_seconds`` + 1 seconds later, when its
heartbeats in the coordination service stop (``skd_jax.peers``). Checkpoints are committed
atomically, so the rerun resumes from the last committed one. A signal during start-up stops
every process before training, with nothing written (``skd_jax.preemption``).
"""

from skd_jax import preemption

if __name__ == '__main__':
  # Before the slow imports below, so that a signal during start-up never ends in a traceback.
  preemption.install()

# pylint: disable=g-import-not-at-top,wrong-import-position
import ast
import difflib
import importlib.util
import json
import logging as pylogging
import os
import re
import sys
import warnings

# What the `train` extra brings (setup.cfg), by the name each is imported as.
_TRAIN_EXTRA = (
    'absl',
    'etils',
    'grain',
    'ml_collections',
    'orbax',
    'PIL',
    'tensorboardX',
    'tensorflow_datasets',
    'tqdm',
)
if __name__ == '__main__':
  # A core install (jax, flax, optax, chex) has no trainer: say so in one line, not a traceback.
  _missing = [name for name in _TRAIN_EXTRA if importlib.util.find_spec(name) is None]
  if _missing:
    sys.exit(
        f"error: the trainer needs skd_jax's train extra ({', '.join(_missing)} missing): "
        "pip install 'skd_jax[train]'"
    )

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from skd_jax import compilation_cache
from skd_jax import config_lib
from skd_jax import generations
from skd_jax import mesh
from skd_jax import peers
from skd_jax import terms
from skd_jax import train
from skd_jax.errors import ConfigError, Diverged, InputError, Preempted, SaveError
from skd_jax.models.spec import is_positive_int

# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file[:argument].', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'Multi-process runs: HOST:PORT of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "Multi-process runs: this process's index.")
_GENERATIONS = flags.DEFINE_integer(
    'generations',
    None,
    'Born-again networks: train this many generations in WORKDIR/generationG, each taught by the '
    'previous one (skd_jax.generations).',
)
_COMPILATION_CACHE = flags.DEFINE_string(
    'compilation_cache',
    None,
    'Folder of the persistent compilation cache, or "off" (default: $SKD_JAX_COMPILATION_CACHE, '
    'else $XDG_CACHE_HOME/skd_jax/jax, i.e. ~/.cache/skd_jax/jax).',
)

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fail(message: str, status: int):
  print(f'error: {message}', file=sys.stderr)
  peers.exit(status)  # returns in a single process
  sys.exit(status)


def _configs_dir() -> str:
  return 'configs' if os.path.isdir('configs') else os.path.join(_REPO, 'configs')


def _help() -> str:
  """The text of ``--help``: usage, the configs, every key with its default, the loss terms."""
  lines = [
      'usage: python -m skd_jax.main --config=configs/NAME.py[:quick] --workdir=DIR '
      '[--config.KEY=VALUE ...]',
      '',
      'Trains and evaluates one run in DIR; rerunning the same command resumes it.',
      '',
      f'Configs (in {_configs_dir()}/; the argument `:quick` switches to offline Fashion-MNIST, a',
      'small ResNet and 8 epochs, minutes on a CPU; without it, the paper protocol on CIFAR-100):',
  ]
  for path in sorted(os.listdir(_configs_dir())):
    if path.endswith('.py') and not path.startswith('_'):
      with open(os.path.join(_configs_dir(), path)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ''
      lines.append(f'  {path[:-3]:<16} {doc.splitlines()[0] if doc else ""}')
  defaults = config_lib.flatten(config_lib.base_config(quick=False))
  lines += [
      '',
      'Keys (--config.KEY=VALUE; the defaults of the PS-KD protocol, which configs change):',
  ]
  for key, doc in config_lib.KEYS.items():
    default = '' if key.endswith('*') else f' = {defaults[key]!r}'
    lines.append(f'  {key}{default}')
    lines.append(f'      {doc}')
  lines += [
      '',
      'Loss terms (loss.TERM.SETTING, with their defaults; see skd_jax/terms/TERM.py; your own:',
      'loss.NAME.module=\'mylab.term\', README "Your own terms, models and optimizers"):',
  ]
  for name, settings in terms.settings().items():
    lines.append(f'  {name}: ' + ', '.join(f'{k}={v!r}' for k, v in settings.items()))
  lines += [
      '',
      'Keys that may change when a run is resumed (recorded in config_changes.jsonl): '
      + ', '.join(config_lib.RESUMABLE)
      + f' (but not {", ".join(config_lib.NOT_RESUMABLE)})',
      '',
      'Born-again networks: --generations=K trains K generations in DIR/generation1..K, each taught',
      'by the one before (a config with a teacher term, e.g. configs/teacher_kd.py); rerun to',
      'continue.',
      '',
      'Several processes: --config.distributed=True detects a Cloud TPU pod or a SLURM job;',
      'elsewhere give --coordinator_address=HOST:PORT --num_processes=N --process_id=I to each',
      '(launch/local.sh N K starts N processes with K CPU devices each on this machine). When a',
      'process dies the others exit 1, at the latest distributed_timeout_seconds + 1 s later.',
      '',
      'Compiled programs are cached in ~/.cache/skd_jax/jax ($XDG_CACHE_HOME/skd_jax/jax), so the',
      'next run of a config starts in seconds, whatever its seed; --compilation_cache=DIR (or',
      f'{compilation_cache.ENV}=DIR) chooses another folder, =off turns the cache off.',
      '',
      'Exit status: 0 finished, or stopped by SIGTERM/SIGINT/SIGHUP (rerun to continue); 1 diverged,',
      'could not write or the input failed; 2 invalid configuration or data (one line, nothing',
      'written).',
  ]
  return '\n'.join(lines)


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if any(line.startswith('Traceback') for line in lines):
    # get_config raised: its own message is the traceback's last line, after the class name.
    return re.sub(r'^[\w.]+: ', '', lines[-1])
  return lines[0]


def _load_config_file(argv) -> ml_collections.ConfigDict:
  """Runs the ``--config`` file's ``get_config`` alone: a file that does not load is one line.

  ml_collections loads the file again when the flags are parsed (and then applies the
  ``--config.KEY`` overrides); this first load is the one whose errors name the file.
  """
  spec = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if spec is None and '--config' in argv[:-1]:
    spec = argv[argv.index('--config') + 1]
  if not spec:
    _fail('--config: expected a config file, e.g. --config=configs/pskd.py:quick', 2)
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    _fail(f'--config: {path} is not a file', 2)
  try:
    module_spec = importlib.util.spec_from_file_location('_skd_jax_config', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
      _fail(f'--config: {path} has no get_config(arg) function', 2)
    config = get_config(arg or None)
  except ConfigError as e:  # the file's own refusal (config_lib.parse_arg's), already one line
    _fail(str(e), 2)
  except Exception as e:  # pylint: disable=broad-exception-caught
    _fail(f'--config: {path} does not load ({type(e).__name__}: {_one_line(e)})', 2)
  if not isinstance(config, ml_collections.ConfigDict):
    _fail(
        f'--config: {path}: get_config returned {type(config).__name__}, expected an '
        'ml_collections.ConfigDict (start from config_lib.base_config())',
        2,
    )
  return config


def _unknown_key(argv, defined: ml_collections.ConfigDict) -> str:
  """Names the first ``--config.KEY`` that the config file does not define, with a suggestion."""
  known = config_lib.flatten(defined)
  where = 'every key is listed by `python -m skd_jax.main --help`'
  for a in argv:
    key = re.match(r'--config\.([\w.]+)', a)
    if key and key.group(1) not in known:
      match = difflib.get_close_matches(key.group(1), list(known), n=1)
      hint = f'; did you mean --config.{match[0]}?' if match else ''
      return f'--config.{key.group(1)}: unknown key{hint} ({where})'
  return f'--config: unknown key ({where})'


def _parse_flags(argv):
  if any(a in ('-h', '--help', '-help', '--helpfull', '-?') for a in argv[1:]):
    print(_help())
    sys.exit(0)
  defined = _load_config_file(argv)
  try:
    argv = flags.FLAGS(argv)
    config = _CONFIG.value
    config_lib.check_complete(config)
  except (KeyError, AttributeError):
    # ConfigDict reports an unknown --config.KEY as a KeyError (wrapped in an AttributeError),
    # with a message that quotes it twice over.
    _fail(_unknown_key(argv, defined), 2)
  except (flags.Error, ConfigError, ValueError, TypeError) as e:
    # A bad --config.KEY value: one line, status 2.
    _fail(_one_line(e), 2)
  if not _WORKDIR.value:
    _fail('--workdir: expected a directory for checkpoints and metrics', 2)
  return argv


def _initialize_distributed(config) -> bool:
  """Starts ``jax.distributed`` from the explicit flags, or by auto-detection if asked to; returns
  whether it did."""
  explicit = {
      '--coordinator_address': _COORDINATOR.value,
      '--num_processes': _NUM_PROCESSES.value,
      '--process_id': _PROCESS_ID.value,
  }
  given = [k for k, v in explicit.items() if v is not None]
  if given and len(given) < len(explicit):
    missing = ', '.join(k for k in explicit if k not in given)
    raise ConfigError(f'{missing}: expected together with {", ".join(given)}')
  timeout = config.distributed_timeout_seconds
  if not is_positive_int(timeout):
    raise ConfigError(f'distributed_timeout_seconds: expected an integer >= 1, got {timeout!r}')
  if not given and not config.distributed:
    return False
  try:
    peers.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, timeout)
  except (ValueError, RuntimeError, TypeError) as e:
    if given:
      raise ConfigError(f'--coordinator_address: cannot start ({_one_line(e)})') from None
    raise ConfigError(
        'distributed: no Cloud TPU, SLURM, Open MPI or Kubernetes cluster detected '
        f'({_one_line(e)}); expected one, or --coordinator_address, --num_processes and '
        '--process_id'
    ) from None
  preemption.join_processes()
  return True


def _use_every_cpu(config) -> None:
  """Makes a single process's CPU backend one device per CPU it may use (``mesh.cpu_devices``),
  unless ``JAX_NUM_CPU_DEVICES`` (``jax_num_cpu_devices``) already says how many. Runs on an
  accelerator do not use the CPU devices; invalid batch sizes are left to validation."""
  sizes = (config.get('batch_size'), config.get('eval_batch_size'))
  if jax.config.jax_num_cpu_devices != -1 or not all(map(is_positive_int, sizes)):
    return
  try:
    jax.config.update('jax_num_cpu_devices', mesh.cpu_devices(sizes))
  except RuntimeError:  # the config's own code already ran JAX: keep what JAX made
    pass


def _exit_for_lost_process(error: Exception, timeout: int):
  """Ends this process of a multi-process run whose collective failed, in one line, status 1.

  When a process dies, the others' next collective fails at once (its connections close) with a
  ``JaxRuntimeError``. Exiting normally would then run ``jax.distributed``'s exit handler, which
  waits at a shutdown barrier for the dead process: so this exits at once, without it
  (``peers.exit``). Checkpoints stay intact (each is committed atomically). A process that stops
  silently (a frozen host) is detected by ``skd_jax.peers`` after ``timeout`` seconds.
  """
  cause = re.sub(r'\[\S+\.cc:\d+\] ', '', _one_line(error))  # gloo's source location
  print(
      f'error: process {jax.process_index()} of {jax.process_count()}: a collective failed '
      f'({cause}): another process died, stopped or fell behind; stopped (a silent process is '
      f'declared dead after distributed_timeout_seconds={timeout})',
      file=sys.stderr,
      flush=True,
  )
  peers.exit(1)


class _WithoutOrbax(pylogging.Filter):
  """Drops orbax's records, and asyncio's about orbax's tasks.

  Orbax logs a failed save as tracebacks from each of its threads and tasks; the trainer reports
  the failure itself, in one line.
  """

  def filter(self, record):
    about_orbax = 'orbax' in record.pathname or 'orbax' in record.getMessage()
    return record.name.startswith('skd_jax') or not about_orbax


def _quiet_failed_io() -> None:
  """Keeps what a failed orbax save or read leaves behind off stderr: the trainer reports the
  failure itself, in one line (a failed save stops the run; a checkpoint that does not restore is
  skipped, and the log says why).

  When one write of an orbax save fails, orbax closes the save's event loop while tensorstore is
  still finishing the others: each then reports "Event loop is closed" as unraisable, and a write
  that never started is a coroutine never awaited, which Python reports as the process exits,
  after the error line. When one read of a restore fails, the reads still pending are closed, and
  orbax turns the GeneratorExit each receives into an exception that Python reports as
  unraisable, with a whole tensorstore spec (some 60 lines per array). skd_jax has no coroutines
  of its own.
  """
  warnings.filterwarnings('ignore', r"coroutine '.*' was never awaited", RuntimeWarning)
  unraisablehook = sys.unraisablehook

  def hook(unraisable):
    loop_closed = (
        unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == 'Event loop is closed'
    )
    read_closed = isinstance(getattr(unraisable.exc_value, '__cause__', None), GeneratorExit)
    if not (loop_closed or read_closed):
      unraisablehook(unraisable)

  sys.unraisablehook = hook


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}', 2)
  # Our progress at INFO; the libraries' at WARNING.
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_handler().addFilter(_WithoutOrbax())
  _quiet_failed_io()
  pylogging.getLogger('skd_jax').setLevel(pylogging.INFO)
  compilation_cache.enable(_COMPILATION_CACHE.value)
  try:
    if not _initialize_distributed(_CONFIG.value):
      _use_every_cpu(_CONFIG.value)
    if _GENERATIONS.value is None:
      summary = train.finished_summary(_CONFIG.value, _WORKDIR.value)
      if summary is None:
        summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      else:
        pylogging.getLogger('skd_jax.main').info(
            'The run in %s is finished: its summary.json.', _WORKDIR.value
        )
    else:
      summaries = generations.train_generations(_CONFIG.value, _WORKDIR.value, _GENERATIONS.value)
      summary = summaries[-1]
  except ConfigError as e:
    _fail(str(e), 2)
  except (Diverged, InputError) as e:
    _fail(str(e), 1)
  except SaveError as e:
    _fail(f'{e}; stopped, the previous checkpoint is intact', 1)
  except OSError as e:  # a workdir file could not be written (a full disk, say)
    _fail(f'{e.filename or "workdir"}: cannot write ({e.strerror or e}); stopped', 1)
  except Preempted as e:
    peers.finished()
    logging.warning('%s', e)
    return
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _exit_for_lost_process(e, _CONFIG.value.distributed_timeout_seconds)
  peers.finished()
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
