"""Tests for skd_jax.models: parameter counts, output shapes, BN state, dtypes."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import models
from skd_jax.errors import ConfigError

CIFAR_SHAPE = (2, 32, 32, 3)
MNIST_SHAPE = (2, 28, 28, 1)
IMAGENET_SHAPE = (1, 224, 224, 3)


def _abstract_variables(model, shape):
  """Variables as ShapeDtypeStructs, without running the initializers."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _abstract_apply(model, variables, shape):
  """(logits, outputs) as ShapeDtypeStructs."""
  return jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)


def _num_params(variables):
  return sum(leaf.size for leaf in jax.tree.leaves(variables['params']))


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _init(model, x):
  return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)


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
#
# ImageNet ResNet-50 and ResNet-152, 1000 classes: torchvision's counts
# (sum(p.numel() for p in torchvision.models.resnet50().parameters())).
@pytest.mark.parametrize(
    'name,num_classes,shape,expected',
    [
        ('cifar_resnet18', 100, CIFAR_SHAPE, 11_220_132),
        ('preact_resnet18', 100, CIFAR_SHAPE, 11_218_340),
        ('small_resnet', 10, MNIST_SHAPE, 77_754),
        ('resnet50', 1000, IMAGENET_SHAPE, 25_557_032),
        ('resnet152', 1000, IMAGENET_SHAPE, 60_192_808),
    ],
)
def test_param_counts(name, num_classes, shape, expected):
  model = models.get_model(name, num_classes=num_classes)
  assert _num_params(_abstract_variables(model, shape)) == expected


def test_param_count_does_not_depend_on_input_size():
  model = models.get_model('cifar_resnet18', num_classes=100)
  variables = _abstract_variables(model, (1, 28, 28, 3))
  assert _num_params(variables) == 11_220_132


@pytest.mark.parametrize(
    'name,num_classes,shape,stem,stages,features',
    [
        (
            'cifar_resnet18',
            100,
            CIFAR_SHAPE,
            (32, 32, 64),
            [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)],
            512,
        ),
        (
            'preact_resnet18',
            100,
            CIFAR_SHAPE,
            (32, 32, 64),
            [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)],
            512,
        ),
        (
            'cifar_resnet18',
            10,
            MNIST_SHAPE,
            (28, 28, 64),
            [(28, 28, 64), (14, 14, 128), (7, 7, 256), (4, 4, 512)],
            512,
        ),
        (
            'small_resnet',
            10,
            MNIST_SHAPE,
            (28, 28, 16),
            [(28, 28, 16), (14, 14, 32), (7, 7, 64)],
            64,
        ),
        (
            'small_resnet',
            100,
            CIFAR_SHAPE,
            (32, 32, 16),
            [(32, 32, 16), (16, 16, 32), (8, 8, 64)],
            64,
        ),
        (
            'resnet50',
            1000,
            IMAGENET_SHAPE,
            (56, 56, 64),
            [(56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048)],
            2048,
        ),
        (
            'resnet152',
            10,
            (2, 64, 64, 3),
            (16, 16, 64),
            [(16, 16, 256), (8, 8, 512), (4, 4, 1024), (2, 2, 2048)],
            2048,
        ),
    ],
)
def test_output_shapes(name, num_classes, shape, stem, stages, features):
  model = models.get_model(name, num_classes=num_classes)
  variables = _abstract_variables(model, shape)
  logits, outputs = _abstract_apply(model, variables, shape)
  batch = shape[0]
  assert logits.shape == (batch, num_classes)
  assert logits.dtype == jnp.float32
  expected_keys = {'stem', 'feature_map', 'features'}
  expected_keys |= {f'stage{i}' for i in range(1, len(stages) + 1)}
  assert set(outputs) == expected_keys
  assert outputs['stem'].shape == (batch,) + stem
  for i, stage_shape in enumerate(stages, start=1):
    assert outputs[f'stage{i}'].shape == (batch,) + stage_shape
  assert outputs['features'].shape == (batch, features)
  assert outputs['feature_map'].shape == (batch,) + stages[-1]


def test_small_resnet_options():
  model = models.get_model('small_resnet', num_classes=10, widths=(8, 16, 24), blocks_per_stage=2)
  variables = _abstract_variables(model, MNIST_SHAPE)
  assert sorted(variables['params']) == sorted(
      ['stem_conv', 'stem_bn', 'head'] + [f'stage{i}_block{j}' for i in (1, 2, 3) for j in (1, 2)]
  )
  _, outputs = _abstract_apply(model, variables, MNIST_SHAPE)
  assert outputs['stage3'].shape == (2, 7, 7, 24)
  assert outputs['features'].shape == (2, 24)


def test_preact_shortcuts_have_no_batch_norm():
  model = models.get_model('preact_resnet18', num_classes=10)
  params = _abstract_variables(model, CIFAR_SHAPE)['params']
  assert 'stem_bn' not in params
  assert 'final_bn' in params
  assert 'shortcut_conv' not in params['stage1_block1']
  assert sorted(params['stage2_block1']) == ['bn1', 'bn2', 'conv1', 'conv2', 'shortcut_conv']


def test_bottleneck_layout_is_torchvision_v1_5():
  """Block contents, the stride on the 3x3 conv, and the max-pooled stem."""
  model = models.get_model('resnet50', num_classes=10)
  variables = _abstract_variables(model, IMAGENET_SHAPE)
  params = variables['params']
  assert sorted(k for k in params if k.startswith('stage')) == sorted(
      f'stage{i}_block{j}' for i, n in enumerate((3, 4, 6, 3), start=1) for j in range(1, n + 1)
  )
  projection = ['bn1', 'bn2', 'bn3', 'conv1', 'conv2', 'conv3', 'shortcut_bn', 'shortcut_conv']
  # Stage 1 keeps the resolution but widens 64 -> 256, so it projects too.
  assert sorted(params['stage1_block1']) == projection
  assert sorted(params['stage2_block2']) == projection[:6]
  block = params['stage2_block1']
  assert block['conv1']['kernel'].shape == (1, 1, 256, 128)
  assert block['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert block['conv3']['kernel'].shape == (1, 1, 128, 512)
  assert block['shortcut_conv']['kernel'].shape == (1, 1, 256, 512)
  assert params['stem_conv']['kernel'].shape == (7, 7, 3, 64)
  # Last BN scale starts at one (torchvision's zero_init_residual=False).
  real = _init(models.Bottleneck(4), _images((1, 8, 8, 16)))
  np.testing.assert_array_equal(real['params']['bn3']['scale'], np.ones(16))
  _, state = jax.eval_shape(
      lambda v: model.apply(
          v, jnp.zeros(IMAGENET_SHAPE), train=False, capture_intermediates=True, mutable=True
      ),
      variables,
  )
  inter = state['intermediates']
  assert inter['stem_conv']['__call__'][0].shape == (1, 112, 112, 64)
  # The stride sits on the 3x3 conv: conv1 keeps stage 1's 56x56, conv2 halves it.
  assert inter['stage2_block1']['conv1']['__call__'][0].shape == (1, 56, 56, 128)
  assert inter['stage2_block1']['conv2']['__call__'][0].shape == (1, 28, 28, 128)


def test_params_are_float32_and_convs_have_no_bias():
  model = models.get_model('cifar_resnet18', num_classes=10, dtype=jnp.bfloat16)
  variables = _abstract_variables(model, CIFAR_SHAPE)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  block = variables['params']['stage2_block1']
  assert set(block['conv1']) == {'kernel'}
  assert set(block['shortcut_conv']) == {'kernel'}
  assert set(variables['params']['head']) == {'kernel', 'bias'}


@pytest.mark.parametrize('name', ['small_resnet', 'preact_resnet18', 'imagenet_resnet'])
def test_train_updates_batch_stats_and_eval_is_deterministic(name, small_variables):
  # preact_resnet18 and the ImageNet ResNet are exercised with tiny widths to
  # keep the test fast; the block wiring is the same as in the full models.
  x = _images(MNIST_SHAPE)
  if name == 'small_resnet':
    model = models.get_model(name, num_classes=10)
    variables = small_variables
  elif name == 'preact_resnet18':
    model = models.PreActResNet(num_classes=10, stage_sizes=(1, 1), widths=(8, 16), strides=(1, 2))
    variables = _init(model, x)
  else:
    model = models.ImageNetResNet(
        num_classes=10, stage_sizes=(1, 1), widths=(4, 8), strides=(1, 2), stem_width=8
    )
    variables = _init(model, x)
  # Jitted, as the trainer calls the model.
  train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  eval_apply = jax.jit(functools.partial(model.apply, train=False))
  eval_apply_mutable = jax.jit(functools.partial(model.apply, train=False, mutable=['batch_stats']))

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
  jax.tree.map(np.testing.assert_array_equal, unchanged['batch_stats'], variables['batch_stats'])
  # Train mode normalizes with batch statistics, so outputs differ from eval.
  assert not np.allclose(logits, first[0])


def test_bfloat16_gives_float32_finite_logits(small_variables):
  # Parameters do not depend on the computation dtype, so the float32 model's
  # variables serve the bfloat16 one.
  model = models.get_model('small_resnet', num_classes=10, dtype=jnp.bfloat16)
  x = _images(MNIST_SHAPE)
  variables = small_variables
  (logits, outputs), _ = jax.jit(
      functools.partial(model.apply, train=True, mutable=['batch_stats'])
  )(variables, x)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert outputs['stage3'].dtype == jnp.bfloat16
  logits_eval, _ = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert logits_eval.dtype == jnp.float32
  assert np.all(np.isfinite(logits_eval))
  # bfloat16 computation stays close to the float32 model with equal params.
  model32 = models.get_model('small_resnet', num_classes=10)
  logits32, _ = jax.jit(functools.partial(model32.apply, train=False))(variables, x)
  np.testing.assert_allclose(logits_eval, logits32, atol=0.1, rtol=0.1)


def test_registry_names():
  assert set(models.MODELS) == {
      'cifar_resnet18',
      'preact_resnet18',
      'resnet152',
      'resnet50',
      'small_resnet',
  }
  assert isinstance(models.get_model('resnet50', num_classes=10), models.ImageNetResNet)
  assert isinstance(models.get_model('cifar_resnet18', num_classes=10), models.ResNet)
  assert isinstance(models.get_model('preact_resnet18', num_classes=10), models.PreActResNet)
  assert isinstance(models.get_model('small_resnet', num_classes=10), models.ResNet)


def test_unknown_model_raises_config_error():
  with pytest.raises(
      ConfigError, match=r'^model\.name: unknown model ' r"'resnet18'; expected one of "
  ):
    models.get_model('resnet18', num_classes=10)


@pytest.mark.parametrize(
    'kwargs,match',
    [
        ({'depth': 20}, r'^model\.depth: not an option'),
        ({'widths': (16, 32)}, r'^model\.widths: expected 3'),
        ({'blocks_per_stage': 0}, r'^model\.blocks_per_stage: expected a positive'),
    ],
)
def test_bad_options_raise_config_error(kwargs, match):
  with pytest.raises(ConfigError, match=match):
    models.get_model('small_resnet', num_classes=10, **kwargs)


def test_bad_num_classes_raises_config_error():
  with pytest.raises(ConfigError, match=r'^model\.num_classes: '):
    models.get_model('small_resnet', num_classes=0)


# Auxiliary heads (skd_jax.models.heads and ResNet.later_stages_head).


def _small_backbone():
  """A 3-stage ResNet that reaches 4x4 on 28x28 inputs, for the head tests."""
  return models.small_resnet(num_classes=10, widths=(16, 32, 64), strides=(2, 2, 2))


def _count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _shapes(tree):
  return jax.tree.map(lambda leaf: leaf.shape, tree)


def test_drg_head_shapes_and_dtypes():
  # Parameters depend on neither the spatial size nor the computation dtype,
  # so one init serves every case.
  variables = _init(models.DRGHead(num_outputs=10), _images((2, 8, 8, 32)))
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  # 7x7 -> 4x4 -> 7x7: the attention map is resized to the input, not doubled.
  for size in (7, 8):
    x = _images((2, size, size, 32))
    for dtype in (jnp.float32, jnp.bfloat16):
      head = models.DRGHead(num_outputs=10, dtype=dtype)
      (logits, features), _ = jax.jit(
          functools.partial(head.apply, train=True, mutable=['batch_stats'])
      )(variables, x)
      assert logits.shape == (2, 10)
      assert logits.dtype == jnp.float32
      assert features.shape == (2, 4 * 32)
      assert features.dtype == dtype
      assert np.all(np.isfinite(logits))


@pytest.mark.parametrize(
    'name,shape,channels',
    [
        ('small_resnet', MNIST_SHAPE, 32),
        ('cifar_resnet18', CIFAR_SHAPE, 128),
    ],
)
def test_drg_head_input_width_follows_backbone(name, shape, channels):
  backbone = models.get_model(name, num_classes=10)
  model = models.WithHeads(backbone, heads=(models.Head('drg', 'stage2', models.DRGHead(40)),))
  params = _abstract_variables(model, shape)['params']['drg']
  attention = params['attention_sepconv']
  assert attention['depthwise1']['kernel'].shape == (3, 3, 1, channels)
  assert set(attention['depthwise1']) == {'kernel'}
  assert attention['pointwise2']['kernel'].shape == (1, 1, channels, channels)
  assert params['sepconv1']['pointwise2']['kernel'].shape == (1, 1, channels, 2 * channels)
  assert params['sepconv2']['depthwise1']['kernel'].shape == (3, 3, 1, 2 * channels)
  assert params['sepconv2']['pointwise2']['kernel'].shape == (1, 1, 2 * channels, 4 * channels)
  _, outputs = _abstract_apply(model, _abstract_variables(model, shape), shape)
  assert outputs['drg'].shape == (shape[0], 40)
  assert outputs['drg/features'].shape == (shape[0], 4 * channels)


def _identity_block_params(width):
  """Parameters of a stride-1 width->width Basic/PreAct block.

  Two 3x3 convs (2 * 9 * width^2) and two BNs on `width` channels (4 * width);
  no projection shortcut.
  """
  return 18 * width * width + 4 * width


@pytest.mark.parametrize(
    'name,stage',
    [
        ('small', 1),
        ('small', 2),
        ('small', 3),
        ('preact_resnet18', 1),
        ('preact_resnet18', 2),
        ('preact_resnet18', 3),
        ('preact_resnet18', 4),
    ],
)
def test_later_stages_head_shapes_and_param_counts(name, stage):
  num_classes = 10
  if name == 'small':
    backbone, shape, num_stages = _small_backbone(), MNIST_SHAPE, 3
  else:
    backbone = models.preact_resnet18(num_classes=num_classes)
    shape, num_stages = CIFAR_SHAPE, 4
  assert backbone.num_stages == num_stages
  backbone_variables = _abstract_variables(backbone, shape)
  backbone_params = backbone_variables['params']
  _, outputs = _abstract_apply(backbone, backbone_variables, shape)
  x = outputs[f'stage{stage}']

  head = backbone.later_stages_head(stage, 4 * num_classes)
  head_variables = _abstract_variables(head, x.shape)
  head_params = head_variables['params']
  logits, features = _abstract_apply(head, head_variables, x.shape)
  width = backbone.widths[-1]
  assert logits.shape == (shape[0], 4 * num_classes)
  assert logits.dtype == jnp.float32
  assert features.shape == (shape[0], width)

  dense = width * 4 * num_classes + 4 * num_classes
  final_bn = 2 * width if name == 'preact_resnet18' else 0
  if stage < num_stages:
    # The head's blocks are copies of the backbone's later stages: same
    # names, same shapes.
    later = {
        key: value
        for key, value in backbone_params.items()
        if key.startswith('stage') and int(key[5]) > stage
    }
    head_blocks = {key: value for key, value in head_params.items() if key.startswith('stage')}
    assert _shapes(head_blocks) == _shapes(later)
    expected = _count(later) + final_bn + dense
  else:
    # One extra stride-1 stage of the last width (HSAKD's CIFAR ResNets).
    assert sorted(key for key in head_params if key.startswith('stage')) == [
        f'stage{num_stages + 1}_block{j}' for j in range(1, backbone.stage_sizes[-1] + 1)
    ]
    expected = backbone.stage_sizes[-1] * _identity_block_params(width) + final_bn + dense
  assert _count(head_params) == expected


@pytest.mark.parametrize('stage', [1, 2])
def test_later_stages_head_of_bottleneck_resnet(stage):
  # Bottleneck stages output 4x their width; the head's pooled features too.
  backbone = models.ImageNetResNet(
      num_classes=10, stage_sizes=(2, 1), widths=(4, 8), strides=(1, 2), stem_width=8
  )
  backbone_variables = _abstract_variables(backbone, MNIST_SHAPE)
  _, outputs = _abstract_apply(backbone, backbone_variables, MNIST_SHAPE)
  assert outputs['stage2'].shape == (2, 4, 4, 32)
  head = backbone.later_stages_head(stage, 40)
  head_variables = _abstract_variables(head, outputs[f'stage{stage}'].shape)
  logits, features = _abstract_apply(head, head_variables, outputs[f'stage{stage}'].shape)
  assert logits.shape == (2, 40)
  assert features.shape == (2, 32)
  if stage == 1:
    assert _shapes(head_variables['params']['stage2_block1']) == _shapes(
        backbone_variables['params']['stage2_block1']
    )
  else:
    # The extra stride-1 stage of the last width: 32 -> 32 channels, no projection.
    assert 'shortcut_conv' not in head_variables['params']['stage3_block1']


@pytest.mark.parametrize('stage', [0, 4, '2', True])
def test_later_stages_head_rejects_bad_stage(stage):
  with pytest.raises(ValueError, match=r'^stage: expected 1\.\.3, got '):
    _small_backbone().later_stages_head(stage, 40)


def _with_heads(backbone):
  return models.WithHeads(
      backbone,
      heads=(
          models.Head('drg', 'stage2', models.DRGHead(40)),
          models.Head('aux1', 'stage1', backbone.later_stages_head(1, 40)),
          models.Head('aux3', 'stage3', backbone.later_stages_head(3, 40)),
      ),
  )


@pytest.fixture(scope='module')
def heads_variables():
  """`_with_heads(_small_backbone())` variables; shared since init compiles slowly."""
  return _init(_with_heads(_small_backbone()), _images(MNIST_SHAPE))


def test_with_heads_keeps_the_backbone_variables_apart(heads_variables):
  backbone = _small_backbone()
  model = _with_heads(backbone)
  x = _images(MNIST_SHAPE)
  variables = heads_variables
  for collection in ('params', 'batch_stats'):
    assert set(variables[collection]) == {'backbone', 'drg', 'aux1', 'aux3'}
  # The inference model has exactly the backbone's parameters.
  alone = _abstract_variables(backbone, MNIST_SHAPE)
  for collection in ('params', 'batch_stats'):
    assert jax.tree.structure(variables[collection]['backbone']) == jax.tree.structure(
        alone[collection]
    )
    assert _shapes(variables[collection]['backbone']) == _shapes(alone[collection])
  assert _count(variables['params']['backbone']) == _count(alone['params'])
  assert _count(variables['params']) > _count(alone['params'])

  logits, outputs = jax.jit(functools.partial(model.apply, train=False))(variables, x)
  assert set(outputs) == {
      'stem',
      'stage1',
      'stage2',
      'stage3',
      'feature_map',
      'features',
      'drg',
      'drg/features',
      'aux1',
      'aux1/features',
      'aux3',
      'aux3/features',
  }
  for name in ('drg', 'aux1', 'aux3'):
    assert outputs[name].shape == (2, 40)
    assert outputs[name].dtype == jnp.float32
  assert outputs['drg/features'].shape == (2, 4 * 32)
  assert outputs['aux1/features'].shape == (2, 64)
  # The backbone alone, on the 'backbone' subtrees, gives the same logits.
  backbone_logits, backbone_outputs = jax.jit(functools.partial(backbone.apply, train=False))(
      {
          'params': variables['params']['backbone'],
          'batch_stats': variables['batch_stats']['backbone'],
      },
      x,
  )
  np.testing.assert_allclose(backbone_logits, logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(backbone_outputs['stage2'], outputs['stage2'], rtol=1e-6, atol=1e-6)


def test_with_heads_names_ignore_preserve_adopted_names():
  # With this Flax option a named backbone would otherwise keep its own name.
  backbone = _small_backbone().clone(name='resnet')
  flax.config.update('flax_preserve_adopted_names', True)
  try:
    params = _abstract_variables(_with_heads(backbone), MNIST_SHAPE)['params']
  finally:
    flax.config.update('flax_preserve_adopted_names', False)
  assert set(params) == {'backbone', 'drg', 'aux1', 'aux3'}


def test_head_gradients_reach_the_backbone_up_to_the_head_stage(heads_variables):
  model = _with_heads(_small_backbone())
  x = _images(MNIST_SHAPE)
  variables = heads_variables

  def head_loss(params, name):
    (_, outputs), _ = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        x,
        train=True,
        mutable=['batch_stats'],
    )
    return -jnp.mean(jax.nn.log_softmax(outputs[name])[:, 0])

  # One compilation for both heads.
  grads = jax.jit(
      lambda params: {
          name: jax.grad(head_loss)(params, name)['backbone'] for name in ('drg', 'aux1')
      }
  )(variables['params'])
  for name, stage in (('drg', 2), ('aux1', 1)):
    for key, subtree in grads[name].items():
      reached = key.startswith('stem') or (key.startswith('stage') and int(key[5]) <= stage)
      # Every parameter up to the head's stage gets a gradient; nothing
      # after it influences the head.
      for leaf in jax.tree.leaves(subtree):
        assert np.any(leaf != 0) == reached, (name, key)


@pytest.mark.parametrize(
    'heads,match',
    [
        ([('a', 'stage9')], r"^heads: head 'a' reads 'stage9', not an output"),
        ([('a', 'stage1'), ('a', 'stage2')], r"^heads: duplicate head names \['a'\]"),
        ([('stage1', 'stage2')], r"^heads: head 'stage1' would overwrite"),
        ([('features', 'stage2')], r"^heads: head 'features' would overwrite"),
        ([('backbone', 'stage2')], r"^heads: the name 'backbone' is reserved"),
    ],
)
def test_with_heads_rejects_bad_heads(heads, match):
  model = models.WithHeads(
      _small_backbone(),
      heads=tuple(models.Head(name, stage, models.DRGHead(10)) for name, stage in heads),
  )
  with pytest.raises(ValueError, match=match):
    _abstract_variables(model, MNIST_SHAPE)
