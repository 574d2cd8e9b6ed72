r"""Command-line entry point.

  python -m skd_jax.main --config=configs/pskd.py:quick --workdir=/tmp/pskd \
      [--config.KEY=VALUE ...]

Exit status: 0 when training finished (the summary is printed) or when a signal stopped it after a
checkpoint (rerun the same command to continue); 2 for invalid configuration or data, with one
line naming the field and nothing written to the workdir; 1 for a non-finite loss, keeping the
last good checkpoint.
"""

import json
import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from skd_jax import train
from skd_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file[:argument].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')


def _fail(message: str, status: int):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _parse_flags(argv):
  try:
    argv = flags.FLAGS(argv)
  except (flags.Error, ConfigError, KeyError, AttributeError, ValueError, TypeError) as e:
    # Unknown --config.KEY, a bad value, a missing or broken config file: one line, status 2.
    _fail(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, 2)
  if _CONFIG.value is None:
    _fail('--config: expected a config file, e.g. --config=configs/pskd.py:quick', 2)
  if not _WORKDIR.value:
    _fail('--workdir: expected a directory for checkpoints and metrics', 2)
  return argv


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}', 2)
  # Our progress at INFO; the libraries' (orbax logs every checkpoint file) at WARNING.
  logging.set_verbosity(logging.WARNING)
  pylogging.getLogger('skd_jax').setLevel(pylogging.INFO)
  config = _CONFIG.value
  if config.get('distributed'):
    jax.distributed.initialize()  # auto-detects Cloud TPU, SLURM, Open MPI, Kubernetes
  try:
    summary = train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as e:
    _fail(str(e), 2)
  except FloatingPointError as e:
    _fail(f'{e}; stopped, the last good checkpoint is kept', 1)
  except train.Preempted as e:
    logging.warning('%s', e)
    return
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
