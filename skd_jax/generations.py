"""Born-again networks (Furlanello et al., ICML 2018): generations trained in sequence, each taught
by the one before.

``train_generations(config, workdir, k)`` trains generation ``g`` in ``workdir/generation<g>``:
generation 1 with cross-entropy alone (the config's terms that need a teacher are replaced by
``loss.cross_entropy`` of weight 1, unless ``teacher.workdir`` names a teacher for it), and every
later generation with the config's loss and the previous generation as its frozen teacher
(``teacher.workdir``). A generation with a ``summary.json`` is finished and skipped, and an
unfinished one resumes from its checkpoints, so rerunning the same command continues the
sequence wherever it stopped.

Before anything is trained, each finished generation's config is compared with the one the
command gives it, as a single run's resume does (``skd_jax.workdir.Workdir``): a change to a key
outside ``config_lib.RESUMABLE`` is refused. A change to a resumable key is allowed but cannot
apply to a finished generation: it applies from the generation trained next, and is logged.
"""

import json
import logging
import os
from typing import Any

from etils import epath
import ml_collections

from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _teacher_terms(config) -> list[str]:
  classes = terms_lib.term_classes()
  return [
      name
      for name in config.loss
      if name in classes and any(f.network == 'teacher' for f in classes[name].forwards)
  ]


def generation_config(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, generation: int
) -> ml_collections.ConfigDict:
  """The config of generation ``generation`` (1-based) of a sequence in ``workdir``."""
  config = ml_collections.ConfigDict(config.to_dict())
  if generation > 1:
    config.teacher.workdir = os.fspath(epath.Path(workdir) / f'generation{generation - 1}')
  elif not config.teacher.workdir:
    config.loss = ml_collections.ConfigDict({'cross_entropy': {'weight': 1.0}})
  return config


def train_generations(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, generations: int, devices=None
) -> list[dict[str, Any]]:
  """Trains (or finishes) ``generations`` generations; returns every generation's summary.

  Raises:
    ConfigError: ``generations`` < 1, the config's loss has no term that uses a teacher,
      ``workdir`` cannot be used (``skd_jax.workdir.check_path``), or a finished generation was
      trained with a config that differs from its config now in a key that may not change on
      resume.
    Whatever ``skd_jax.train.train_and_evaluate`` raises, for the generation being trained.
  """
  if not isinstance(generations, int) or generations < 1:
    raise ConfigError(f'--generations: expected a positive integer, got {generations!r}')
  if not _teacher_terms(config):
    raise ConfigError(
        '--generations: the config has no loss term that uses a teacher; expected one such as '
        'loss.teacher_kd (configs/teacher_kd.py)'
    )
  workdir_lib.check_path(workdir)
  for generation in range(1, generations + 1):
    directory = epath.Path(workdir) / f'generation{generation}'
    if not (directory / 'summary.json').exists():
      break  # generations finish in order: the rest are not finished either
    try:
      finished = workdir_lib.Workdir(
          directory, generation_config(config, workdir, generation), is_main=False
      )
    except ConfigError as e:
      raise ConfigError(f'--generations: generation {generation}: {e}') from None
    if finished.changes:
      log.info(
          'Generation %d is finished: the changes %s apply from the next generation trained.',
          generation,
          finished.changes,
      )
  summaries = []
  for generation in range(1, generations + 1):
    directory = epath.Path(workdir) / f'generation{generation}'
    done = directory / 'summary.json'
    if done.exists():
      summaries.append(json.loads(done.read_text()))
      log.info('Generation %d/%d is finished (%s).', generation, generations, done)
      continue
    log.info('Generation %d/%d in %s.', generation, generations, directory)
    summary = train.train_and_evaluate(
        generation_config(config, workdir, generation), directory, devices
    )
    summaries.append(summary)
  return summaries
