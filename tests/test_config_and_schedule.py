"""Config files, their validation, and the learning-rate schedules."""

import importlib
import os
import re
import sys

import jax
import ml_collections
import numpy as np
import pytest

from skd_jax import config_lib
from skd_jax import terms as terms_lib
from skd_jax import optim
from skd_jax.errors import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
CONFIGS = [
    'aikd',
    'bake',
    'baseline',
    'beta_smoothing',
    'byot',
    'cskd',
    'cskd_lsskd',
    'ddgsd',
    'dks',
    'dlb',
    'drg',
    'dsr',
    'frskd',
    'label_smoothing',
    'lightskd',
    'lsskd',
    'mixskd',
    'pskd',
    'pskd_dlb',
    'pskd_dsr_drg',
    'sd_dropout',
    'teacher_kd',
    'tfkd_reg',
    'tfkd_self',
    'uskd',
    'zipf_ls',
]


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'quick'])
def test_configs_are_valid_and_build_their_terms(name, arg):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  config_lib.validate(config, device_count=8)
  method = terms_lib.build(config.loss, terms_lib.Context(10, config.num_epochs, 128, num_stages=3))
  assert [t.name for t in method.terms] == sorted(config.loss)
  assert importlib.import_module(f'configs.{name}').__doc__.count('python -m skd_jax.main') >= 2


# Quick setups lighter than the baseline's because theirs would take over 10 minutes on a 2-core
# CPU; each config's docstring says so.
LIGHTER_QUICK = {'lsskd': {'num_epochs': 2}, 'cskd_lsskd': {'num_epochs': 2}}


def test_quick_variants_share_the_baselines_setup():
  """Quick runs differ from the baseline's only in the loss, so their numbers compare."""
  baseline = importlib.import_module('configs.baseline').get_config('quick')
  for name in CONFIGS:
    quick = importlib.import_module(f'configs.{name}').get_config('quick')
    quick.loss = baseline.loss
    for key, value in LIGHTER_QUICK.get(name, {}).items():
      assert quick[key] == value, name
      quick[key] = baseline[key]
    assert quick.to_dict() == baseline.to_dict(), name


@pytest.mark.parametrize('name', CONFIGS)
def test_every_quick_config_states_its_measured_wall_time(name):
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert re.search(r'Measured \(2-core CPU, [\d,]+ s wall', doc), name


def test_paper_protocol_defaults():
  config = importlib.import_module('configs.pskd').get_config()
  assert (config.data.name, config.model.name, config.num_epochs, config.batch_size) == (
      'cifar100',
      'preact_resnet18',
      300,
      128,
  )
  assert tuple(config.optim.boundaries) == (150, 225) and config.optim.nesterov
  assert config.loss.pskd.alpha_T == 0.8
  quick = importlib.import_module('configs.pskd').get_config('quick')
  assert (quick.data.source, quick.data.name) == ('idx', 'fashion_mnist')
  lightskd = importlib.import_module('configs.lightskd').get_config()
  assert (lightskd.model.name, lightskd.num_epochs, tuple(lightskd.optim.boundaries)) == (
      'cifar_resnet18',
      200,
      (60, 120, 160),
  )
  assert (
      lightskd.loss.drg.alpha,
      lightskd.loss.drg.temperature,
      lightskd.loss.dsr.weight,
      lightskd.loss.dsr.temperature,
  ) == (0.2, 4.0, 1.0, 4.0)
  lsskd = importlib.import_module('configs.lsskd').get_config()
  assert (lsskd.optim.warmup_epochs, tuple(lsskd.optim.boundaries)) == (5, (100, 150))
  assert lsskd.loss.lsskd.temperature == 3.0


def test_unknown_config_argument_is_a_config_error():
  with pytest.raises(ConfigError, match="unknown option 'fast'"):
    importlib.import_module('configs.pskd').get_config('fast')


@pytest.mark.parametrize('config', ['ddgsd', 'mixskd'])
@pytest.mark.parametrize('arg', ['variant=torch', 'variant', 'quick,variant=Official'])
def test_a_variant_outside_a_configs_choices_is_one_config_error(config, arg):
  with pytest.raises(ConfigError, match=r"^--config argument: variant must be one of \['"):
    importlib.import_module(f'configs.{config}').get_config(arg)


def test_a_choice_defaults_to_its_first_entry_and_takes_any_other():
  assert config_lib.parse_arg(None, quick=False, variant=('a', 'b')).to_dict() == dict(
      quick=False, variant='a'
  )
  assert config_lib.parse_arg('variant=b', quick=False, variant=('a', 'b')).variant == 'b'


@pytest.mark.parametrize(
    'arg, quick',
    [
        (None, False),
        ('quick', True),
        ('quick=true', True),
        ('quick=false', False),
        ('quick=No', False),
        ('quick=1', True),
        ('quick=0', False),
    ],
)
def test_a_boolean_config_argument_reads_true_and_false(arg, quick):
  """``bool('false')`` is True: ``:quick=false`` once ran the quick setup."""
  assert config_lib.parse_arg(arg, quick=False).quick is quick


@pytest.mark.parametrize(
    'arg, message',
    [
        ('quick=2', "quick must be true or false, got '2'"),
        ('size=big', "size must be of type int, got 'big'"),
    ],
)
def test_a_config_argument_of_the_wrong_type_is_refused_naming_it(arg, message):
  with pytest.raises(ConfigError, match=f'^--config argument: {re.escape(message)}$'):
    config_lib.parse_arg(arg, quick=False, size=3)


@pytest.mark.parametrize(
    'key, value, message',
    [
        ('seed', -1, 'seed: expected an integer in [0, 9223372036854775807], got -1'),
        ('seed', 2**63, f'seed: expected an integer in [0, {2**63 - 1}], got {2**63}'),
        ('optim.lr', 1e300, 'optim.lr: expected a finite number, got 1e+300 (inf in float32)'),
        ('loss.pskd.weight', -1e39, 'loss.pskd.weight: expected a finite number, got -1e+39'),
        ('optim.boundaries', ('a',), 'optim.boundaries: expected increasing epochs in (0, num_'),
        ('optim.boundaries', (5, 5), 'optim.boundaries: expected increasing epochs in (0, num_'),
        ('optim.boundaries', (6, 3), 'optim.boundaries: expected increasing epochs in (0, num_'),
        ('data.train_split', 'bogus', "data.train_split: expected 'train' or 'test' for Fashion"),
        ('data.test_split', 'validation', "data.test_split: expected 'train' or 'test' for"),
    ],
)
def test_values_that_failed_late_or_silently_are_refused_naming_the_key(key, value, message):
  """Each one passed validation: a traceback after the data loaded, or a step of infinities."""
  config = importlib.import_module('configs.pskd').get_config('quick')
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=f'^{re.escape(message)}'):
    config_lib.validate(config, device_count=1)


def test_a_config_lacking_a_section_or_a_key_of_the_base_config_is_refused_naming_it():
  """A section replaced whole on the command line, or a ConfigDict made by hand."""
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.optim = ml_collections.ConfigDict({'lr': 0.1})
  with pytest.raises(ConfigError, match=r'^optim.boundaries: missing; a config starts from'):
    config_lib.validate(config, device_count=1)
  with pytest.raises(ConfigError, match=r'^data: missing; a config starts from'):
    config_lib.check_complete(ml_collections.ConfigDict({'seed': 0}))
  with pytest.raises(ConfigError, match=r'^--config: expected an ml_collections.ConfigDict, got'):
    config_lib.check_complete({'seed': 0})
  for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), '..', 'configs'))):
    if name.endswith('.py') and name != '__init__.py':
      config_lib.check_complete(importlib.import_module(f'configs.{name[:-3]}').get_config())


@pytest.mark.parametrize('value', [0.0, -1.0, float('inf')])
def test_an_input_timeout_must_be_a_positive_number_of_seconds(value):
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.data.timeout_seconds = value
  with pytest.raises(ConfigError, match='^data.timeout_seconds: expected a'):
    config_lib.validate(config, device_count=1)


def test_unknown_term_is_a_config_error():
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.loss.no_such_term = {'weight': 1.0}
  with pytest.raises(ConfigError, match='loss.no_such_term: unknown loss term'):
    terms_lib.build(config.loss, terms_lib.Context(10, 4, 128))


def test_step_schedule_with_warmup():
  config = importlib.import_module('configs.pskd').get_config()
  config.optim.warmup_epochs = 2
  schedule = optim.make_schedule(config.optim, steps_per_epoch=10, num_epochs=300)
  lr = lambda step: float(schedule(step))
  assert lr(0) == 0.0 and lr(10) == pytest.approx(0.05) and lr(20) == pytest.approx(0.1)
  assert lr(1499) == pytest.approx(0.1) and lr(1500) == pytest.approx(0.01)
  assert lr(2249) == pytest.approx(0.01) and lr(2250) == pytest.approx(0.001)


def test_step_schedule_without_warmup_matches_multistep_lr():
  config = importlib.import_module('configs.pskd').get_config()
  schedule = optim.make_schedule(config.optim, steps_per_epoch=391, num_epochs=300)
  epochs = np.array([0, 149, 150, 224, 225, 299])
  np.testing.assert_allclose(
      [float(schedule(e * 391)) for e in epochs], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6
  )


def test_cosine_schedule_with_warmup():
  config = importlib.import_module('configs.pskd').get_config('quick')
  config.optim.warmup_epochs = 1
  schedule = optim.make_schedule(config.optim, steps_per_epoch=10, num_epochs=4)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(0.1)
  assert float(schedule(25)) == pytest.approx(0.05, rel=1e-5)
  assert float(schedule(40)) == pytest.approx(0.0, abs=1e-7)


def test_weight_decay_is_added_to_the_gradient_before_momentum():
  config = importlib.import_module('configs.pskd').get_config()
  tx = optim.make_optimizer(config.optim, lambda step: 0.1)
  params = {'w': jax.numpy.array([2.0])}
  updates, _ = tx.update({'w': jax.numpy.array([1.0])}, tx.init(params), params)
  # Nesterov: d = g + wd*w = 1.001; buf = d; update = -lr * (d + 0.9 * buf) = -0.1 * 1.9019.
  np.testing.assert_allclose(updates['w'], [-0.1 * 1.001 * 1.9], rtol=1e-6)
