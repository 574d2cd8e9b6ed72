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
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from skd_jax import train
from skd_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file[:argument].', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, summary.')


def _fail(message: str, status: int):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if any(line.startswith('Traceback') for line in lines):
    # get_config raised: its own message is the traceback's last line, after the class name.
    return re.sub(r'^[\w.]+: ', '', lines[-1])
  return lines[0]


def _parse_flags(argv):
  try:
    argv = flags.FLAGS(argv)
    config = _CONFIG.value
    config.keys()  # the file loads lazily, on first use: make it load here
  except OSError as e:
    # A missing or broken config file: the useful part is the last line of the message.
    _fail(
        f'--config: cannot load {flags.FLAGS["config"].config_filename} '
        f'({str(e).strip().splitlines()[-1].strip()})',
        2,
    )
  except (KeyError, AttributeError) as e:
    # ConfigDict reports an unknown --config.KEY as a KeyError (wrapped in an AttributeError).
    key = re.search(r"'(\w+)'", str(e))
    _fail(
        f"--config: unknown key '{key.group(1) if key else e}'; the config file lists the keys", 2
    )
  except (flags.Error, ConfigError, ValueError, TypeError) as e:
    # A bad --config.KEY value or an error raised by get_config: one line, status 2.
    _fail(_one_line(e), 2)
  if config is None:
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
