"""The configuration every run shares, and its validation.

Config files in ``configs/`` start from :func:`base_config` and override what their method and
paper need. The argument after the colon (``--config=configs/pskd.py:quick``) is parsed by
:func:`parse_arg`; ``quick`` switches to the offline Fashion-MNIST setup.
"""

import json
import math

import ml_collections

from skd_jax import plugins
from skd_jax import terms
from skd_jax.data.idx import FASHION_MNIST_DIR
from skd_jax.errors import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'quick,k=v'`` into a ConfigDict; bare words become ``True``.

  Values are converted to the type of the matching default (a boolean is ``true``/``false``,
  ``yes``/``no`` or ``1``/``0``). A tuple of strings as a default is a choice: its first entry is
  the default, and a value must be one of its entries.
  """
  choices = {k: v for k, v in defaults.items() if isinstance(v, tuple)}
  parsed = ml_collections.ConfigDict({k: v[0] if k in choices else v for k, v in defaults.items()})
  for token in (arg or '').split(','):
    if not token:
      continue
    key, _, value = token.partition('=')
    if key not in defaults:
      raise ConfigError(
          f'--config argument: unknown option {key!r}; expected one of ' f'{sorted(defaults)}'
      )
    if key in choices and value not in choices[key]:
      raise ConfigError(
          f'--config argument: {key} must be one of {sorted(choices[key])}, got {value!r}'
      )
    parsed[key] = _parse_value(key, value, parsed[key]) if value else True
  return parsed


_BOOLEANS = {'true': True, 'yes': True, '1': True, 'false': False, 'no': False, '0': False}


def _parse_value(key: str, value: str, default):
  """``value`` as the type of ``default``; a ConfigError naming the option otherwise."""
  if isinstance(default, bool):
    if value.lower() not in _BOOLEANS:
      raise ConfigError(f'--config argument: {key} must be true or false, got {value!r}')
    return _BOOLEANS[value.lower()]
  try:
    return type(default)(value)
  except ValueError:
    raise ConfigError(
        f'--config argument: {key} must be of type {type(default).__name__}, got {value!r}'
    ) from None


PROTOCOLS = ('pskd', 'lightskd', 'selfkd_lib')


def base_config(quick: bool, protocol: str = 'pskd') -> ml_collections.ConfigDict:
  """The shared defaults; every key is described in :data:`KEYS`.

  Without ``quick``, a paper's CIFAR-100 protocol (all with batch 128, SGD with momentum 0.9, lr
  0.1, weight decay 5e-4, random crop with 4 pixels of padding and horizontal flips):

  * ``'pskd'`` (PS-KD): PreAct ResNet-18, 300 epochs, Nesterov, lr / 10 at epochs 150 and 225.
  * ``'lightskd'`` (LightSKD's DRG/DSR): CIFAR ResNet-18, 200 epochs, lr / 10 at 60, 120 and 160;
    the paper does not state Nesterov, so plain momentum.
  * ``'selfkd_lib'`` (Self-KD-Lib's common self-KD table; see docs/methods.md): CIFAR
    ResNet-18, 200 epochs, 5 warm-up epochs, lr / 10 at 100 and 150, plain momentum.

  With ``quick`` (any protocol): Fashion-MNIST from the Debian package ``dataset-fashion-mnist``,
  a small ResNet (first stage at half resolution, ~2,000 img/s on a 2-core CPU), 8 epochs, cosine
  decay, so every method's quick run is comparable with the baseline's.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol: expected one of {PROTOCOLS}, got {protocol!r}')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'
  c.data.name = 'cifar100'
  c.data.dir = ''
  c.data.download = True
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.augment = 'cifar'
  c.data.image_size = 224
  c.data.eval_resize = 256
  c.data.pipeline = 'device'
  c.data.workers = 0
  c.data.prefetch = 4
  c.data.timeout_seconds = 300.0
  c.data.train_examples = 0
  c.data.subset_seed = 0
  c.data.label_noise = 0.0
  c.data.noise_seed = 0
  c.data.module = ''

  c.model = ml_collections.ConfigDict()
  c.model.name = 'preact_resnet18'
  c.model.dtype = 'float32'
  c.model.module = ''

  c.num_epochs = 300
  c.batch_size = 128
  c.eval_batch_size = 1000

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'step'
  c.optim.boundaries = (150, 225)
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0
  c.optim.module = ''

  # Loss terms: name -> settings (a `weight` and the term's own; omitted ones take the defaults
  # --help shows); the terms are summed.
  c.loss = ml_collections.ConfigDict()

  # A frozen teacher for the terms that ask for one (teacher_kd): another run's workdir.
  c.teacher = ml_collections.ConfigDict()
  c.teacher.workdir = ''

  c.log_every_steps = 50
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.distributed = False
  c.distributed_timeout_seconds = 100

  if protocol != 'pskd':
    c.model.name = 'cifar_resnet18'
    c.num_epochs = 200
    c.optim.nesterov = False
  if protocol == 'lightskd':
    c.optim.boundaries = (60, 120, 160)
  elif protocol == 'selfkd_lib':
    c.optim.boundaries = (100, 150)
    c.optim.warmup_epochs = 5

  if quick:
    c.data.source = 'idx'
    c.data.name = 'fashion_mnist'
    c.data.dir = FASHION_MNIST_DIR
    c.data.download = False
    c.data.crop_padding = 2
    c.model.name = 'small_resnet'
    c.model.widths = (16, 32, 64)
    c.model.strides = (2, 2, 2)
    c.num_epochs = 8
    c.optim.schedule = 'cosine'
    c.optim.nesterov = True
    c.optim.boundaries = ()
    c.optim.warmup_epochs = 0
    c.log_every_steps = 25
  return c


def imagenet_protocol(c: ml_collections.ConfigDict, model: str) -> None:
  """Turns a ``base_config(quick=False)`` into the PS-KD paper's ImageNet protocol, in place.

  TFDS ``imagenet2012`` (manual download) through the host pipeline; random-resized 224-pixel
  crops and flips; evaluation on the centre 224 crop of the 256-resized validation images;
  ``model`` ('resnet152' or 'resnet50') in bfloat16; 90 epochs of batch 256; SGD with Nesterov
  momentum, lr 0.1 / 10 at epochs 30 and 60, weight decay 1e-4.
  """
  c.data.source = 'tfds'
  c.data.name = 'imagenet2012'
  c.data.download = False
  c.data.test_split = 'validation'
  c.data.pipeline = 'host'
  c.data.augment = 'imagenet'
  c.data.crop_padding = 0
  c.data.image_size = 224
  c.data.eval_resize = 256
  c.data.workers = 8
  c.model.name = model
  c.model.dtype = 'bfloat16'
  c.num_epochs = 90
  c.batch_size = 256
  c.eval_batch_size = 1000
  c.optim.nesterov = True
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'step'
  c.optim.boundaries = (30, 60)
  c.log_every_steps = 100


# Every key of `base_config`, documented; `python -m skd_jax.main --help` prints this with the
# defaults. `model.*` and `loss.*` stand for the families of keys a config adds.
KEYS = {
    'seed': 'PRNG seed of the initialisation, the data order and the augmentation',
    'data.source': "'tfds' (any TFDS image-classification dataset) or 'idx' (Fashion-MNIST files)",
    'data.name': "TFDS dataset name, e.g. 'cifar100'; 'fashion_mnist' for source 'idx'",
    'data.dir': "TFDS data_dir, or the folder of the idx files ('' = the default)",
    'data.download': 'TFDS: download and prepare a missing dataset (needs internet and tensorflow)',
    'data.train_split': "split to train on, e.g. 'train' or 'train[:90%]'",
    'data.test_split': 'split evaluated after every epoch',
    'data.crop_padding': 'random crop after zero padding by this many pixels (0: no crop)',
    'data.flip': 'random horizontal flips',
    'data.augment': "'cifar' (data.crop_padding, data.flip) or 'imagenet' (host pipeline, images "
    'of any size: random-resized crops to data.image_size and data.flip; evaluation resizes the '
    'shorter side to data.eval_resize and centre-crops data.image_size)',
    'data.image_size': "'imagenet' augmentation: side of the square training and test crops",
    'data.eval_resize': "'imagenet' augmentation: shorter side of test images before the crop",
    'data.pipeline': "'device' (the split on every device, batches made in the step) or 'host' "
    '(each process reads its share of every batch on the host: data larger than device memory)',
    'data.workers': "'host' pipeline: worker processes that read and augment (0: threads)",
    'data.prefetch': "'host' pipeline: steps read ahead",
    'data.timeout_seconds': "'host' pipeline: seconds an input worker may deliver no batch before "
    "the run saves a checkpoint and stops with status 1 (a worker's first batch, its start-up, "
    'may take 10 times as long)',
    'data.train_examples': 'train on a class-balanced subset of this many examples, N / C of each '
    'of the C classes (0: the whole split); N must be a multiple of C and every class must have '
    'N / C examples (skd_jax/data/selection.py)',
    'data.subset_seed': 'seed of the subset drawn for data.train_examples (independent of seed)',
    'data.label_noise': 'symmetric label noise, in [0, 1): exactly round(rate * N) training labels '
    'are replaced by one of the other classes, uniformly; the test split is untouched',
    'data.noise_seed': 'seed of the examples data.label_noise changes and of their new labels '
    '(independent of seed)',
    'data.module': "import path of your own data's module, e.g. 'mylab.data': its "
    'make(data, split) returns the whole split as a skd_jax.data.Dataset; data.source and '
    'data.name are then labels (device pipeline only)',
    'model.name': 'cifar_resnet18, preact_resnet18, small_resnet, resnet50 or resnet152 (see '
    'skd_jax/models)',
    'model.dtype': "computation dtype, 'float32' or 'bfloat16' (parameters stay float32)",
    'model.module': "import path of your own model's module, e.g. 'mylab.nets': its "
    'make(*, num_classes, dtype, **options) returns the Flax model; model.name is then only a label '
    '(README: "Your own terms, models and optimizers")',
    'model.*': "the model's architecture options, e.g. model.widths and model.strides",
    'num_epochs': 'epochs to train',
    'batch_size': 'global batch size, divisible by the number of devices',
    'eval_batch_size': 'global evaluation batch size, divisible by the number of devices',
    'optim.lr': 'peak learning rate of SGD',
    'optim.momentum': 'SGD momentum, in [0, 1)',
    'optim.nesterov': 'Nesterov momentum',
    'optim.weight_decay': 'L2 penalty added to the gradient (PyTorch SGD), >= 0',
    'optim.schedule': "'step' (multiply by decay_factor at boundaries) or 'cosine'",
    'optim.boundaries': "epochs at which 'step' decays the learning rate",
    'optim.decay_factor': "factor of each 'step' decay",
    'optim.warmup_epochs': 'epochs of linear warm-up from 0',
    'optim.module': "import path of your own optimizer's module, e.g. 'mylab.opt': its "
    'make(optim, schedule) returns an optax.GradientTransformation in place of SGD (the optim.* '
    'keys above that it does not read are ignored); cannot change on resume',
    'loss.*': 'loss terms, summed: loss.TERM.weight and the settings of skd_jax/terms/TERM.py '
    "(below); your own term: loss.NAME.module='mylab.term', a module with one terms.LossTerm "
    'dataclass (or a make(settings, context) that returns the term)',
    'teacher.workdir': "an earlier run's workdir (or its model/ folder): the frozen teacher",
    'log_every_steps': 'steps per train record in metrics.jsonl (the mean over those steps)',
    'checkpoint_every_epochs': 'epochs between checkpoints (the last epoch is always saved)',
    'keep_checkpoints': 'checkpoints kept, >= 1 (older ones are deleted)',
    'distributed': 'call jax.distributed.initialize() to auto-detect a TPU pod or SLURM cluster',
    'distributed_timeout_seconds': 'multi-process runs: seconds without heartbeats after which a '
    'process counts as dead and the others exit 1 (one that exits is noticed at once)',
}

# Keys a run may change when it is resumed: the optimizer's hyperparameters (e.g. a lower learning
# rate after a divergence) and settings that do not change what is trained. Every change is
# recorded in the workdir's config_changes.jsonl with the step it took effect at; changing any
# other key is refused.
RESUMABLE = (
    'optim.*',
    'data.dir',
    'data.download',
    'data.workers',
    'data.prefetch',
    'data.timeout_seconds',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_epochs',
    'keep_checkpoints',
    'distributed',
    'distributed_timeout_seconds',
)


def flatten(tree, prefix: str = '') -> dict[str, object]:
  """``{'optim': {'lr': 0.1}}`` -> ``{'optim.lr': 0.1}`` (a ConfigDict, or its JSON)."""
  items = tree.items() if hasattr(tree, 'items') else ()
  flat = {}
  for key, value in items:
    if hasattr(value, 'items'):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def documentation(key: str) -> str | None:
  """The description of ``key`` in :data:`KEYS` (or of its family, ``model.*``), or None."""
  family = key.split('.')[0] + '.*'
  return KEYS.get(key, KEYS.get(family))


# Resumable by the pattern above, but what they name is not a hyperparameter: another optimizer.
NOT_RESUMABLE = ('optim.module',)


def resumable(key: str) -> bool:
  if key in NOT_RESUMABLE:
    return False
  return any(key == k or (k.endswith('.*') and key.startswith(k[:-1])) for k in RESUMABLE)


MISSING = object()
"""What :func:`recorded` gives for a key a recorded configuration neither has nor implies."""


def recorded(flat: dict[str, object], key: str) -> object:
  """The value of ``key`` in the run whose flattened configuration (a ``config.json``) is
  ``flat``: its own, or for a key it lacks, the default of a key a newer skd_jax added; else
  :data:`MISSING`.

  A run resumed by a newer skd_jax meets keys its ``config.json`` lacks; at their defaults they
  do what the older version did (a new key's default never changes what is trained). Only keys
  skd_jax defines have one: those of :func:`base_config`, and the settings of a built-in loss
  term the run has (``loss.TERM.SETTING``, ``loss.TERM`` without a ``module``). Keys the user
  names have none: a loss term the run has not (whatever its settings, its defaults included), a
  plug-in term's settings, the model's options (``model.*`` beyond :func:`base_config`'s).
  """
  if key in flat:
    return flat[key]
  defaults = flatten(base_config(quick=False))
  parts = key.split('.')
  if len(parts) == 3 and parts[0] == 'loss':
    term = f'loss.{parts[1]}.'
    if any(k.startswith(term) for k in flat) and f'{term}module' not in flat:
      defaults = {f'{term}{k}': v for k, v in terms.settings().get(parts[1], {}).items()}
  if key not in defaults:
    return MISSING
  # As config.json holds it (a tuple as a list).
  return json.loads(ml_collections.ConfigDict({'v': defaults[key]}).to_json_best_effort())['v']


_DTYPES = ('float32', 'bfloat16')
_FLOAT32_MAX = 3.4028234663852886e38


def check_complete(config) -> None:
  """A ConfigError naming the first key of :func:`base_config` that ``config`` lacks.

  Config files start from ``base_config`` and add to it; a section replaced whole on the command
  line (``--config.optim='{"lr": 0.1}'``) or a hand-made ConfigDict may lack keys.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
        f'--config: expected an ml_collections.ConfigDict, got {type(config).__name__}'
    )

  def missing(key):
    return ConfigError(
        f'{key}: missing; a config starts from config_lib.base_config(), which sets every key '
        '(replace single keys of a section, e.g. --config.optim.lr=0.1, not the whole section)'
    )

  for section in ('data', 'model', 'optim', 'loss', 'teacher'):
    value = config.get(section)
    if value is None:
      raise missing(section)
    if not isinstance(value, ml_collections.ConfigDict):
      raise ConfigError(f'{section}: expected a section of keys, got {value!r}')
  present = flatten(config)
  for key in flatten(base_config(quick=False)):
    if key not in present:
      raise missing(key)


def validate(config: ml_collections.ConfigDict, *, device_count: int) -> None:
  """Checks the values that can be checked without loading data.

  Raises:
    ConfigError: naming the first invalid field and what it expects.
  """
  check_complete(config)

  def check(ok, field, expectation):
    if not ok:
      raise ConfigError(f'{field}: {expectation}')

  def number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)

  def integer(field, low, high=None):
    value = config[field]
    expected = f'in [{low}, {high}]' if high is not None else f'>= {low}'
    check(
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value <= (value if high is None else high),
        field,
        f'expected an integer {expected}, got {value!r}',
    )

  # NaN and infinity pass most range checks (nan > 0 is False, but so is every check's negation),
  # so every number of the config, loss-term settings included, is checked once here; a float
  # beyond float32's range would become infinite in the float32 step.
  for key, value in flatten(config).items():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if number(v) and not isinstance(v, int):
        check(math.isfinite(v), key, f'expected a finite number, got {v!r}')
        check(abs(v) <= _FLOAT32_MAX, key, f'expected a finite number, got {v!r} (inf in float32)')

  integer('seed', 0, 2**63 - 1)

  check(
      not config.data.get('module') or config.data.pipeline == 'device',
      'data.module',
      f"needs data.pipeline='device', got {config.data.pipeline!r}",
  )
  check(
      config.data.source in ('tfds', 'idx'),
      'data.source',
      f"expected 'tfds' or 'idx', got {config.data.source!r}",
  )
  integer('num_epochs', 1)
  integer('batch_size', 1)
  check(
      config.batch_size % device_count == 0,
      'batch_size',
      f'{config.batch_size} is not divisible by the {device_count} devices',
  )
  integer('eval_batch_size', 1)
  check(
      config.eval_batch_size % device_count == 0,
      'eval_batch_size',
      f'expected a positive multiple of the {device_count} devices, '
      f'got {config.eval_batch_size}',
  )
  check(
      config.model.dtype in _DTYPES,
      'model.dtype',
      f'expected one of {_DTYPES}, got {config.model.dtype!r}',
  )
  optim = config.optim
  check(
      optim.schedule in ('step', 'cosine'),
      'optim.schedule',
      f"expected 'step' or 'cosine', got {optim.schedule!r}",
  )
  check(number(optim.lr) and optim.lr > 0, 'optim.lr', f'expected > 0, got {optim.lr!r}')
  check(
      number(optim.momentum) and 0 <= optim.momentum < 1,
      'optim.momentum',
      f'expected a number in [0, 1), got {optim.momentum!r}',
  )
  check(
      number(optim.weight_decay) and optim.weight_decay >= 0,
      'optim.weight_decay',
      f'expected a number >= 0, got {optim.weight_decay!r}',
  )
  check(
      number(optim.decay_factor) and optim.decay_factor > 0,
      'optim.decay_factor',
      f'expected a number > 0, got {optim.decay_factor!r}',
  )
  check(
      0 <= optim.warmup_epochs < config.num_epochs,
      'optim.warmup_epochs',
      f'expected in [0, num_epochs), got {optim.warmup_epochs}',
  )
  check(
      isinstance(optim.boundaries, (tuple, list))
      and all(number(b) and 0 < b < config.num_epochs for b in optim.boundaries)
      and list(optim.boundaries) == sorted(set(optim.boundaries)),  # (5, 5) would decay once
      'optim.boundaries',
      f'expected increasing epochs in (0, num_epochs={config.num_epochs}), got '
      f'{optim.boundaries}',
  )
  integer('data.crop_padding', 0)
  check(
      config.data.pipeline in ('device', 'host'),
      'data.pipeline',
      f"expected 'device' or 'host', got {config.data.pipeline!r}",
  )
  check(
      config.data.augment in ('cifar', 'imagenet'),
      'data.augment',
      f"expected 'cifar' or 'imagenet', got {config.data.augment!r}",
  )
  if config.data.augment == 'imagenet':
    check(
        config.data.pipeline == 'host',
        'data.augment',
        f"'imagenet' needs data.pipeline='host', got {config.data.pipeline!r}",
    )
    check(
        config.data.crop_padding == 0,
        'data.crop_padding',
        f"expected 0 with data.augment='imagenet', got {config.data.crop_padding!r}",
    )
    integer('data.image_size', 1)
    integer('data.eval_resize', config.data.image_size)
  if config.data.source == 'idx' and not config.data.module:
    for split in ('data.train_split', 'data.test_split'):
      check(
          config[split] in ('train', 'test'),
          split,
          f"expected 'train' or 'test' for Fashion-MNIST idx files, got {config[split]!r}",
      )
  integer('data.train_examples', 0)
  integer('data.subset_seed', 0)
  check(
      number(config.data.label_noise) and 0 <= config.data.label_noise < 1,
      'data.label_noise',
      f'expected a fraction in [0, 1), got {config.data.label_noise!r}',
  )
  integer('data.noise_seed', 0)
  integer('data.workers', 0)
  integer('data.prefetch', 1)
  check(
      number(config.data.timeout_seconds) and config.data.timeout_seconds > 0,
      'data.timeout_seconds',
      f'expected a number of seconds > 0, got {config.data.timeout_seconds!r}',
  )
  # Plug-ins named by import path must import and provide make(), before any data is loaded.
  for field in [f'{s}.module' for s in ('data', 'model', 'optim') if config[s].get('module')]:
    plugins.load(config[field], field)
  # The loss terms and their settings, as far as they can be checked without the data (the
  # checks that need the run, e.g. a stage of the model, are the terms' own, in terms.build).
  terms.validate(config.loss)
  integer('log_every_steps', 1)
  integer('checkpoint_every_epochs', 1)
  integer('keep_checkpoints', 1)
