"""The configuration every run shares, and its validation.

Config files in ``configs/`` start from :func:`base_config` and override what their method and
paper need. The argument after the colon (``--config=configs/pskd.py:quick``) is parsed by
:func:`parse_arg`; ``quick`` switches to the offline Fashion-MNIST setup.
"""

import ml_collections

from skd_jax.data.idx import FASHION_MNIST_DIR
from skd_jax.errors import ConfigError


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses ``'quick,k=v'`` into a ConfigDict; bare words become ``True``.

  Values are converted to the type of the matching default.
  """
  parsed = ml_collections.ConfigDict(defaults)
  for token in (arg or '').split(','):
    if not token:
      continue
    key, _, value = token.partition('=')
    if key not in defaults:
      raise ConfigError(
          f'--config argument: unknown option {key!r}; expected one of ' f'{sorted(defaults)}'
      )
    parsed[key] = type(defaults[key])(value) if value else True
  return parsed


PROTOCOLS = ('pskd', 'lightskd', 'selfkd_lib')


def base_config(quick: bool, protocol: str = 'pskd') -> ml_collections.ConfigDict:
  """The shared defaults.

  Without ``quick``, a paper's CIFAR-100 protocol (all with batch 128, SGD with momentum 0.9, lr
  0.1, weight decay 5e-4, random crop with 4 pixels of padding and horizontal flips):

  * ``'pskd'`` (PS-KD): PreAct ResNet-18, 300 epochs, Nesterov, lr / 10 at epochs 150 and 225.
  * ``'lightskd'`` (LightSKD's DRG/DSR): CIFAR ResNet-18, 200 epochs, lr / 10 at 60, 120 and 160;
    the paper does not state Nesterov, so plain momentum.
  * ``'selfkd_lib'`` (the common self-KD table of METHODS.md section 4): CIFAR ResNet-18, 200
    epochs, 5 warm-up epochs, lr / 10 at 100 and 150, plain momentum.

  With ``quick`` (any protocol): Fashion-MNIST from the Debian package ``dataset-fashion-mnist``,
  a small ResNet (first stage at half resolution, ~2,000 img/s on a 2-core CPU), 8 epochs, cosine
  decay, so every method's quick run is comparable with the baseline's.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'protocol: expected one of {PROTOCOLS}, got {protocol!r}')
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'  # 'tfds' or 'idx' (Fashion-MNIST idx files).
  c.data.name = 'cifar100'
  c.data.dir = ''  # idx folder, or TFDS data_dir ('' = TFDS default).
  c.data.download = True  # TFDS only: download and prepare when missing.
  c.data.train_split = 'train'
  c.data.test_split = 'test'
  c.data.crop_padding = 4
  c.data.flip = True

  c.model = ml_collections.ConfigDict()
  c.model.name = 'preact_resnet18'
  c.model.dtype = 'float32'

  c.num_epochs = 300
  c.batch_size = 128
  c.eval_batch_size = 1000

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.optim.nesterov = True
  c.optim.weight_decay = 5e-4
  c.optim.schedule = 'step'  # 'step' or 'cosine'.
  c.optim.boundaries = (150, 225)  # epochs, for 'step'.
  c.optim.decay_factor = 0.1
  c.optim.warmup_epochs = 0

  # Loss terms: name -> settings (always with a `weight`); the terms are summed.
  c.loss = ml_collections.ConfigDict()

  c.log_every_steps = 50
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.distributed = False  # call jax.distributed.initialize() (TPU pods, SLURM).

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


_DTYPES = ('float32', 'bfloat16')


def validate(config: ml_collections.ConfigDict, *, device_count: int) -> None:
  """Checks the values that can be checked without loading data.

  Raises:
    ConfigError: naming the first invalid field and what it expects.
  """

  def check(ok, field, expectation):
    if not ok:
      raise ConfigError(f'{field}: {expectation}')

  check(
      config.data.source in ('tfds', 'idx'),
      'data.source',
      f"expected 'tfds' or 'idx', got {config.data.source!r}",
  )
  check(
      isinstance(config.num_epochs, int) and config.num_epochs > 0,
      'num_epochs',
      f'expected a positive integer, got {config.num_epochs!r}',
  )
  check(
      isinstance(config.batch_size, int) and config.batch_size > 0,
      'batch_size',
      f'expected a positive integer, got {config.batch_size!r}',
  )
  check(
      config.batch_size % device_count == 0,
      'batch_size',
      f'{config.batch_size} is not divisible by the {device_count} devices',
  )
  check(
      config.eval_batch_size > 0 and config.eval_batch_size % device_count == 0,
      'eval_batch_size',
      f'expected a positive multiple of the {device_count} devices, '
      f'got {config.eval_batch_size}',
  )
  check(
      config.model.dtype in _DTYPES,
      'model.dtype',
      f'expected one of {_DTYPES}, got {config.model.dtype!r}',
  )
  check(
      config.optim.schedule in ('step', 'cosine'),
      'optim.schedule',
      f"expected 'step' or 'cosine', got {config.optim.schedule!r}",
  )
  check(config.optim.lr > 0, 'optim.lr', f'expected > 0, got {config.optim.lr}')
  check(
      0 <= config.optim.warmup_epochs < config.num_epochs,
      'optim.warmup_epochs',
      f'expected in [0, num_epochs), got {config.optim.warmup_epochs}',
  )
  check(
      all(0 < b < config.num_epochs for b in config.optim.boundaries),
      'optim.boundaries',
      f'expected epochs in (0, num_epochs={config.num_epochs}), got {config.optim.boundaries}',
  )
  check(
      config.data.crop_padding >= 0,
      'data.crop_padding',
      f'expected >= 0, got {config.data.crop_padding}',
  )
  check(len(config.loss) > 0, 'loss', 'expected at least one loss term')
  check(config.log_every_steps > 0, 'log_every_steps', 'expected a positive integer')
  check(
      config.checkpoint_every_epochs > 0, 'checkpoint_every_epochs', 'expected a positive integer'
  )
