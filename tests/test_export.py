"""The exported model on its own: round trip, devices, refusals, input checks, light imports."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import skd_jax
from skd_jax import export
from skd_jax.data import pipeline
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
