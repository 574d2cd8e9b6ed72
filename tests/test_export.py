"""The exported model on its own: round trip, devices, refusals, input checks, light imports."""

import dataclasses
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import skd_jax
from skd_jax import checkpoints
from skd_jax import export
from skd_jax import models
from skd_jax import networks
from skd_jax.data import pipeline
from skd_jax.errors import ConfigError
from jax.sharding import NamedSharding, PartitionSpec as P

SPEC = export.ModelSpec(
    name='small_resnet',
    options={'dtype': 'float32', 'widths': (8, 16, 32), 'strides': (2, 2, 2)},
    num_classes=10,
    input_shape=(28, 28, 1),
    mean=(0.3,),
    std=(0.2,),
)


@pytest.fixture(scope='module')
def variables():
  """Initialised variables with BatchNorm statistics that differ from their initial values."""
  module = SPEC.module()
  v = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)
  stats = jax.tree.map(lambda x: x + 0.1 * jnp.arange(x.size).reshape(x.shape), v['batch_stats'])
  return {'params': v['params'], 'batch_stats': stats}


@pytest.fixture(scope='module')
def exported(tmp_path_factory, variables):
  """A model exported once; tests damage copies of it."""
  path = tmp_path_factory.mktemp('exported') / 'model'
  export.save_model(str(path), spec=SPEC, **variables)
  return path


def _copy(exported, tmp_path):
  shutil.copytree(exported, tmp_path / 'model')
  return tmp_path / 'model'


def _largest_data_file(model):
  files = [os.path.join(d, f) for d, _, fs in os.walk(model / 'variables') for f in fs]
  return max(files, key=os.path.getsize)


def _images(n=5):
  return np.random.default_rng(0).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)


def _expected(variables, images):
  x = pipeline.normalize(images, np.float32(SPEC.mean), np.float32(SPEC.std))
  return SPEC.module().apply(variables, x, train=False)[0]


def test_round_trip_from_the_workdir_or_the_model_folder(tmp_path, monkeypatch, variables):
  export.save_model(str(tmp_path / 'wd' / 'model'), spec=SPEC, **variables)
  monkeypatch.chdir(tmp_path)
  images = _images()
  for path in ('wd', 'wd/model', tmp_path / 'wd'):
    model = skd_jax.load_model(path)
    assert model.spec == SPEC and model.num_classes == 10 and model.input_shape == (28, 28, 1)
    # Equal up to float32 rounding: the model is jitted, the expectation runs op by op.
    np.testing.assert_allclose(model(images), _expected(variables, images), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model(jnp.asarray(images)), model(images))


def test_a_model_trained_on_8_devices_loads_on_one(tmp_path, variables):
  replicated = NamedSharding(jax.make_mesh((8,), ('data',), devices=jax.devices()[:8]), P())
  export.save_model(str(tmp_path / 'model'), spec=SPEC, **jax.device_put(variables, replicated))
  model = skd_jax.load_model(tmp_path)
  leaves = jax.tree.leaves(model.variables)
  assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in leaves)
  np.testing.assert_allclose(
      model(_images()), _expected(variables, _images()), rtol=1e-5, atol=1e-7
  )


def test_non_finite_variables_are_refused_and_nothing_is_written(tmp_path, variables):
  broken = jax.tree.map(lambda x: x, variables)
  broken['batch_stats']['stem_bn']['var'] = (
      broken['batch_stats']['stem_bn']['var'].at[0].set(jnp.inf)
  )
  with pytest.raises(FloatingPointError, match=r'non-finite values in batch_stats/stem_bn/var'):
    export.save_model(str(tmp_path / 'model'), spec=SPEC, **broken)
  assert not (tmp_path / 'model').exists()


def test_bad_inputs_and_paths_get_one_line_errors(tmp_path, variables):
  export.save_model(str(tmp_path / 'model'), spec=SPEC, **variables)
  model = skd_jax.load_model(tmp_path)
  with pytest.raises(
      ValueError, match=r'^images: expected uint8 pixels in \[0, 255\], got float32$'
  ):
    model(_images().astype(np.float32))
  with pytest.raises(
      ValueError, match=r'^images: expected shape \[N, 28, 28, 1\], got \[5, 28, 28\]$'
  ):
    model(_images()[..., 0])
  with pytest.raises(FileNotFoundError, match='no exported model; expected a run'):
    skd_jax.load_model(tmp_path / 'nowhere')


def test_importing_the_losses_loads_neither_orbax_nor_flax():
  code = 'import sys, skd_jax.losses; print(any(m in sys.modules for m in ("orbax", "flax")))'
  out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=True,
      env={**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(__file__))},
  )
  assert out.stdout.strip() == 'False'


def test_a_flipped_bit_is_refused_naming_the_array_and_as_a_teacher(tmp_path, exported):
  model = _copy(exported, tmp_path)
  with open(_largest_data_file(model), 'r+b') as f:
    data = bytearray(f.read())
    data[len(data) // 2] ^= 1
    f.seek(0)
    f.write(data)
  # Where the bit lands decides which check sees it: a changed value or a non-finite one.
  damaged = (
      rf'^{model}/variables: (does not match its fingerprint|holds non-finite values) in '
      r'params/\S+; the exported model is damaged$'
  )
  with pytest.raises(export.ModelError, match=damaged):
    skd_jax.load_model(model)
  with pytest.raises(ConfigError, match='^teacher.workdir: ' + damaged[1:]):
    networks.load_teacher(str(tmp_path), wanted=True)


def test_stored_arrays_one_sign_bit_away_are_refused(tmp_path, exported, variables):
  """A sign bit flipped at an odd position: the change version-1 fingerprints could not see."""
  model = _copy(exported, tmp_path)
  kernel = variables['params']['stage3_block1']['conv2']['kernel']
  flipped = {**variables, 'params': {**variables['params']}}
  flipped['params']['stage3_block1'] = {
      **flipped['params']['stage3_block1'],
      'conv2': {'kernel': kernel.reshape(-1).at[1].multiply(-1).reshape(kernel.shape)},
  }
  export.save_model(str(tmp_path / 'other'), spec=SPEC, **flipped)
  shutil.rmtree(model / 'variables')
  shutil.copytree(tmp_path / 'other' / 'variables', model / 'variables')
  with pytest.raises(
      export.ModelError,
      match=rf'^{model}/variables: does not match its fingerprint in '
      r'params/stage3_block1/conv2/kernel; the exported model is damaged$',
  ):
    skd_jax.load_model(model)


def test_a_truncated_data_file_is_one_line(tmp_path, exported):
  model = _copy(exported, tmp_path)
  with open(_largest_data_file(model), 'r+b') as f:
    f.truncate(os.path.getsize(f.name) // 2)
  with pytest.raises(export.ModelError, match=rf'^{model}/variables: cannot read \([^\n]+\)$'):
    skd_jax.load_model(model)


def _edit_spec(model, edit):
  with open(model / 'spec' / 'metadata') as f:
    spec = json.load(f)
  with open(model / 'spec' / 'metadata', 'w') as f:
    json.dump(edit(spec), f)


def _set(key, value, *, option=False):
  def edit(spec):
    (spec['options'] if option else spec)[key] = value
    return spec

  return edit


@pytest.mark.parametrize(
    'edit, message',
    [
        pytest.param(lambda spec: [spec], 'spec: expected a JSON object, got list', id='list'),
        pytest.param(
            lambda spec: {k: v for k, v in spec.items() if k != 'mean'},
            "spec: no field 'mean'",
            id='missing',
        ),
        pytest.param(
            _set('num_classes', '10'),
            "spec: num_classes: expected a positive integer, got '10'",
            id='string',
        ),
        pytest.param(
            _set('input_shape', [100000, 100000, 1]),
            r'spec: input_shape: expected \[H, W, C\]',
            id='40GB_input',
        ),
        pytest.param(
            _set('std', [0.2, 0.2]),
            r'spec: std: expected one finite number per channel \(1\)',
            id='std_channels',
        ),
        pytest.param(
            _set('name', 'nothing'), "spec: model.name: unknown model 'nothing'", id='name'
        ),
        pytest.param(
            _set('depth', 3, option=True),
            "spec: model.depth: not an option of model 'small_resnet'",
            id='option',
        ),
        pytest.param(
            _set('widths', 'abc', option=True),
            'spec: model.widths: expected a sequence of positive integers',
            id='option_type',
        ),
        pytest.param(
            _set('blocks_per_stage', 200000, option=True),
            'spec: options.blocks_per_stage: 200000 is more than .*variables holds',
            id='200000_blocks',
        ),
        pytest.param(
            _set('blocks_per_stage', 2, option=True),
            'spec: implies a layer stage1_block2 that the stored arrays lack',
            id='2_blocks',
        ),
        pytest.param(
            _set('widths', [8, 16, 30], option=True),
            r'variables: batch_stats/stage3_block1/bn1/mean is float32\[32\]; the spec implies',
            id='width',
        ),
    ],
)
def test_an_invalid_spec_is_refused_in_one_line_before_anything_is_allocated(
    tmp_path, exported, edit, message
):
  model = _copy(exported, tmp_path)
  _edit_spec(model, edit)
  start = time.perf_counter()
  with pytest.raises(export.ModelError, match=f'^{model}/{message}'):
    skd_jax.load_model(model)
  assert time.perf_counter() - start < 3  # a trace of 200000 blocks takes minutes


def test_a_changed_normalisation_is_refused_as_damage(tmp_path, exported):
  """A value that is still valid (one digit of the mean) is caught by the spec's own digest."""
  model = _copy(exported, tmp_path)
  _edit_spec(model, _set('mean', [SPEC.mean[0] + 1e-3]))
  with pytest.raises(
      export.ModelError,
      match=rf'^{model}/spec: does not match its fingerprint \(spec_sha256\); the exported model '
      'is damaged$',
  ):
    skd_jax.load_model(model)


def test_a_model_exported_without_a_fingerprint_loads_with_a_warning(tmp_path, exported, caplog):
  model = _copy(exported, tmp_path)
  _edit_spec(
      model,
      lambda spec: {k: v for k, v in spec.items() if k not in ('fingerprint', 'spec_sha256')},
  )
  with caplog.at_level(logging.WARNING, logger='skd_jax.export'):
    assert skd_jax.load_model(model).spec == SPEC
  assert 'exported without a fingerprint' in caplog.text and 'cannot be verified' in caplog.text


def test_a_model_fingerprinted_before_versions_still_loads_and_is_still_checked(
    tmp_path, exported, variables
):
  """Models exported by earlier skd_jax hold a flat version-1 fingerprint."""
  old = checkpoints._checksums(variables, 1)[0]
  for fingerprint, loads in ((old, True), ({**old, 'params/head/bias': 1}, False)):
    model = _copy(exported, tmp_path / str(loads))
    _edit_spec(model, lambda spec: {**spec, 'fingerprint': fingerprint})
    if loads:
      assert skd_jax.load_model(model).spec == SPEC
    else:
      with pytest.raises(export.ModelError, match='does not match its fingerprint in params/head'):
        skd_jax.load_model(model)


# resnet152 has resnet50's kinds of layers, three times as many: 4 s more.
@pytest.mark.parametrize('name', sorted(set(models.MODELS) - {'resnet152'}))
def test_the_layer_guard_lets_every_registered_model_through(name):
  """Each of its layers holds arrays, so a spec that agrees with its files is never refused."""
  spec = dataclasses.replace(
      SPEC, name=name, options={}, input_shape=(32, 32, 3), mean=(0.5,) * 3, std=(0.2,) * 3
  )
  module = spec.module()
  shapes = jax.eval_shape(
      functools.partial(module.init, train=False),
      jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
  )
  stored = {export._leaf_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
  assert export._abstract_variables(spec, module, stored, 'spec') == shapes
