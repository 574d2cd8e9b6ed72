"""Tests for skd_jax.models: parameter counts, output shapes, BN state, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import models
from skd_jax.errors import ConfigError

CIFAR_SHAPE = (2, 32, 32, 3)
MNIST_SHAPE = (2, 28, 28, 1)


def _abstract_variables(model, shape):
  """Variables as ShapeDtypeStructs, without running the initializers."""
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _abstract_apply(model, variables, shape):
  """(logits, outputs) as ShapeDtypeStructs."""
  return jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)


def _num_params(variables):
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _init(model, x):
  return jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), x)


@pytest.fixture(scope='module')
def small_variables():
  """SmallResNet variables for 10 classes; shared since init compiles slowly."""
  model = models.get_model('small_resnet', num_classes=10)
  return _init(model, _images(MNIST_SHAPE))


# Analytic parameter counts (weights + biases + BN scale/bias; BN running
# statistics live in 'batch_stats' and are excluded).
#
# CIFAR ResNet-18 (kuangliu layout), 100 classes:
#   stem conv 3*3*3*64 = 1,728; stem BN 128
#   stage1: 2 blocks * (2 * 36,864 + 2 * 128)                    =   147,968
#   stage2: (73,728 + 147,456 + 512 + 8,192 + 256) + 295,424     =   525,568
#   stage3: (294,912 + 589,824 + 1,024 + 32,768 + 512)
#           + 1,180,672                                          = 2,099,712
#   stage4: (1,179,648 + 2,359,296 + 2,048 + 131,072 + 1,024)
#           + 4,720,640                                          = 8,393,728
#   head 512*100 + 100 = 51,300
#   total 11,220,132
#
# PreAct ResNet-18, 100 classes, relative to the above:
#   - stem BN                                                    -   128
#   - the first block of stages 2-4 normalizes its *input*, so
#     bn1 has 64/128/256 channels instead of 128/256/512         -   896
#   - projection shortcuts have no BN (2 * (128 + 256 + 512))    - 1,792
#   + final BN on 512 channels                                   + 1,024
#   total 11,220,132 - 1,792 = 11,218,340
#
# SmallResNet, widths (16, 32, 64), 1 block per stage, 1 input channel,
# 10 classes:
#   stem conv 3*3*1*16 = 144 + BN 32                             =     176
#   stage1: 2 * 2,304 + 2 * 32                                   =   4,672
#   stage2: 4,608 + 9,216 + 2 * 64 + (512 + 64)                  =  14,528
#   stage3: 18,432 + 36,864 + 2 * 128 + (2,048 + 128)            =  57,728
#   head 64*10 + 10                                              =     650
#   total 77,754
@pytest.mark.parametrize('name,num_classes,shape,expected', [
    ('cifar_resnet18', 100, CIFAR_SHAPE, 11_220_132),
    ('preact_resnet18', 100, CIFAR_SHAPE, 11_218_340),
    ('small_resnet', 10, MNIST_SHAPE, 77_754),
])
def test_param_counts(name, num_classes, shape, expected):
  model = models.get_model(name, num_classes=num_classes)
  assert _num_params(_abstract_variables(model, shape)) == expected


def test_param_count_does_not_depend_on_input_size():
  model = models.get_model('cifar_resnet18', num_classes=100)
  variables = _abstract_variables(model, (1, 28, 28, 3))
  assert _num_params(variables) == 11_220_132


@pytest.mark.parametrize('name,num_classes,shape,stem,stages,features', [
    ('cifar_resnet18', 100, CIFAR_SHAPE, (32, 32, 64),
     [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)], 512),
    ('preact_resnet18', 100, CIFAR_SHAPE, (32, 32, 64),
     [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)], 512),
    ('cifar_resnet18', 10, MNIST_SHAPE, (28, 28, 64),
     [(28, 28, 64), (14, 14, 128), (7, 7, 256), (4, 4, 512)], 512),
    ('small_resnet', 10, MNIST_SHAPE, (28, 28, 16),
     [(28, 28, 16), (14, 14, 32), (7, 7, 64)], 64),
    ('small_resnet', 100, CIFAR_SHAPE, (32, 32, 16),
     [(32, 32, 16), (16, 16, 32), (8, 8, 64)], 64),
])
def test_output_shapes(name, num_classes, shape, stem, stages, features):
  model = models.get_model(name, num_classes=num_classes)
  variables = _abstract_variables(model, shape)
  logits, outputs = _abstract_apply(model, variables, shape)
  batch = shape[0]
  assert logits.shape == (batch, num_classes)
  assert logits.dtype == jnp.float32
  expected_keys = {'stem', 'features'} | {
      f'stage{i}' for i in range(1, len(stages) + 1)}
  assert set(outputs) == expected_keys
  assert outputs['stem'].shape == (batch,) + stem
  for i, stage_shape in enumerate(stages, start=1):
    assert outputs[f'stage{i}'].shape == (batch,) + stage_shape
  assert outputs['features'].shape == (batch, features)


def test_small_resnet_options():
  model = models.get_model('small_resnet', num_classes=10,
                           widths=(8, 16, 24), blocks_per_stage=2)
  variables = _abstract_variables(model, MNIST_SHAPE)
  assert sorted(variables['params']) == sorted(
      ['stem_conv', 'stem_bn', 'head'] +
      [f'stage{i}_block{j}' for i in (1, 2, 3) for j in (1, 2)])
  _, outputs = _abstract_apply(model, variables, MNIST_SHAPE)
  assert outputs['stage3'].shape == (2, 7, 7, 24)
  assert outputs['features'].shape == (2, 24)


def test_preact_shortcuts_have_no_batch_norm():
  model = models.get_model('preact_resnet18', num_classes=10)
  params = _abstract_variables(model, CIFAR_SHAPE)['params']
  assert 'stem_bn' not in params
  assert 'final_bn' in params
  assert 'shortcut_conv' not in params['stage1_block1']
  assert sorted(params['stage2_block1']) == [
      'bn1', 'bn2', 'conv1', 'conv2', 'shortcut_conv']


def test_params_are_float32_and_convs_have_no_bias():
  model = models.get_model('cifar_resnet18', num_classes=10,
                           dtype=jnp.bfloat16)
  variables = _abstract_variables(model, CIFAR_SHAPE)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  block = variables['params']['stage2_block1']
  assert set(block['conv1']) == {'kernel'}
  assert set(block['shortcut_conv']) == {'kernel'}
  assert set(variables['params']['head']) == {'kernel', 'bias'}


@pytest.mark.parametrize('name', ['small_resnet', 'preact_resnet18'])
def test_train_updates_batch_stats_and_eval_is_deterministic(
    name, small_variables):
  # preact_resnet18 is exercised with tiny widths to keep the test fast; the
  # block wiring is the same as in the full model.
  x = _images(MNIST_SHAPE)
  if name == 'small_resnet':
    model = models.get_model(name, num_classes=10)
    variables = small_variables
  else:
    model = models.PreActResNet(num_classes=10, stage_sizes=(1, 1),
                                widths=(8, 16), strides=(1, 2))
    variables = _init(model, x)
  # Jitted, as the trainer calls the model.
  train_apply = jax.jit(functools.partial(model.apply, train=True,
                                          mutable=['batch_stats']))
  eval_apply = jax.jit(functools.partial(model.apply, train=False))
  eval_apply_mutable = jax.jit(functools.partial(
      model.apply, train=False, mutable=['batch_stats']))

  (logits, _), updates = train_apply(variables, x)
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(updates['batch_stats'])
  assert len(old) == len(new)
  assert all(not np.allclose(a, b) for a, b in zip(old, new))

  first = eval_apply(variables, x)
  second = eval_apply(variables, x)
  jax.tree.map(np.testing.assert_array_equal, first, second)
  # Eval mode leaves batch_stats untouched even when they are mutable.
  _, unchanged = eval_apply_mutable(variables, x)
  jax.tree.map(np.testing.assert_array_equal, unchanged['batch_stats'],
               variables['batch_stats'])
  # Train mode normalizes with batch statistics, so outputs differ from eval.
  assert not np.allclose(logits, first[0])


def test_bfloat16_gives_float32_finite_logits(small_variables):
  # Parameters do not depend on the computation dtype, so the float32 model's
  # variables serve the bfloat16 one.
  model = models.get_model('small_resnet', num_classes=10, dtype=jnp.bfloat16)
  x = _images(MNIST_SHAPE)
  variables = small_variables
  (logits, outputs), _ = jax.jit(functools.partial(
      model.apply, train=True, mutable=['batch_stats']))(variables, x)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert outputs['stage3'].dtype == jnp.bfloat16
  logits_eval, _ = jax.jit(functools.partial(model.apply, train=False))(
      variables, x)
  assert logits_eval.dtype == jnp.float32
  assert np.all(np.isfinite(logits_eval))
  # bfloat16 computation stays close to the float32 model with equal params.
  model32 = models.get_model('small_resnet', num_classes=10)
  logits32, _ = jax.jit(functools.partial(model32.apply, train=False))(
      variables, x)
  np.testing.assert_allclose(logits_eval, logits32, atol=0.1, rtol=0.1)


def test_registry_names():
  assert set(models.MODELS) == {
      'cifar_resnet18', 'preact_resnet18', 'small_resnet'}
  assert isinstance(models.get_model('cifar_resnet18', num_classes=10),
                    models.ResNet)
  assert isinstance(models.get_model('preact_resnet18', num_classes=10),
                    models.PreActResNet)
  assert isinstance(models.get_model('small_resnet', num_classes=10),
                    models.ResNet)


def test_unknown_model_raises_config_error():
  with pytest.raises(ConfigError, match=r"^model\.name: unknown model "
                     r"'resnet50'; expected one of "):
    models.get_model('resnet50', num_classes=10)


@pytest.mark.parametrize('kwargs,match', [
    ({'depth': 20}, r'^model\.depth: not an option'),
    ({'widths': (16, 32)}, r'^model\.widths: expected 3'),
    ({'blocks_per_stage': 0}, r'^model\.blocks_per_stage: expected a positive'),
])
def test_bad_options_raise_config_error(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    models.get_model('small_resnet', num_classes=10, **kwargs)


def test_bad_num_classes_raises_config_error():
  with pytest.raises(ConfigError, match=r'^model\.num_classes: '):
    models.get_model('small_resnet', num_classes=0)
