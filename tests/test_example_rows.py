"""The sharded per-example tables: exact reads and writes, duplicates, padding, communication."""

import re

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from skd_jax import example_rows
from skd_jax import mesh as mesh_lib
from skd_jax import train


@pytest.fixture(params=[1, 8], ids=['1dev', '8dev'])
def mesh(request):
  return train.make_mesh(jax.devices()[: request.param])


def _table(mesh, n=37, c=5):
  rows = example_rows.padded_rows(n, mesh)
  host = np.arange(rows * c, dtype=np.float32).reshape(rows, c)
  return host, jax.device_put(host, mesh_lib.sharded(mesh))


def test_padded_rows_is_a_multiple_of_the_devices(mesh):
  assert example_rows.padded_rows(37, mesh) % mesh.shape['data'] == 0
  assert 37 <= example_rows.padded_rows(37, mesh) < 37 + mesh.shape['data']


def test_gather_reads_exact_rows_including_repeats(mesh):
  host, table = _table(mesh)
  index = jnp.array([36, 0, 5, 5, 17, 9, 36, 1], jnp.int32)
  got = jax.jit(lambda t, i: example_rows.gather(t, i, mesh))(table, index)
  np.testing.assert_array_equal(got, host[np.asarray(index)])
  assert got.sharding.spec == P('data')


def test_scatter_writes_kept_rows_and_the_last_of_duplicates(mesh):
  host, table = _table(mesh)
  index = jnp.array([3, 30, 3, 8, 12, 30, 21, 0], jnp.int32)
  keep = jnp.array([True, True, True, True, False, True, True, True])
  values = -jnp.arange(8 * 5, dtype=jnp.float32).reshape(8, 5) - 1
  values = jax.device_put(values, NamedSharding(mesh, P('data')))
  got = jax.jit(lambda t, i, v, k: example_rows.scatter(t, i, v, k, mesh))(
      table, index, values, keep
  )
  expected = host.copy()
  for slot in [0, 1, 2, 3, 5, 6, 7]:  # in order: later duplicates overwrite earlier ones
    expected[int(index[slot])] = np.asarray(values[slot])
  np.testing.assert_array_equal(got, expected)
  assert not np.any(np.asarray(got)[12] < 0)  # dropped padding slot never written


def test_last_occurrence():
  got = example_rows.last_occurrence(jnp.array([4, 1, 4, 2, 1, 4]))
  np.testing.assert_array_equal(got, [False, False, False, True, True, True])


def test_communication_is_batch_sized_not_table_sized():
  mesh = train.make_mesh(jax.devices()[:8])
  n, c, b = 4096, 10, 16
  table = jax.device_put(jnp.zeros((n, c)), mesh_lib.sharded(mesh))
  index = jnp.arange(b, dtype=jnp.int32)
  values = jax.device_put(jnp.ones((b, c)), NamedSharding(mesh, P('data')))

  def step(t, i, v):
    rows = example_rows.gather(t, i, mesh)
    return example_rows.scatter(t, i, v + rows, jnp.ones(b, bool), mesh)

  hlo = jax.jit(step).lower(table, index, values).compile().as_text()
  collectives = re.findall(
      r'= (\S+) (all-gather|reduce-scatter|all-reduce|all-to-all|' r'collective-permute)\(', hlo
  )
  assert collectives, 'expected batch-sized collectives'
  for shape, _ in collectives:
    dims = [int(d) for d in re.findall(r'\d+', shape.split('{')[0].split('[')[-1])]
    assert int(np.prod(dims or [1])) <= b * c, (shape, 'moves more than batch x classes')


def test_pytrees_of_tables_of_any_dtype_gather_and_scatter_leaf_by_leaf(mesh):
  """PS-KD's top-k history: int16 indices and bfloat16 values, with padding and duplicates."""
  rows = example_rows.padded_rows(37, mesh)
  host = {
      'indices': np.arange(rows * 3, dtype=np.int16).reshape(rows, 3),
      'values': (np.arange(rows * 3).reshape(rows, 3) / 4).astype(jnp.bfloat16),
  }
  tables = jax.device_put(host, mesh_lib.sharded(mesh))
  index = jnp.array([36, 0, 5, 5, 17, 9, 36, 1], jnp.int32)
  got = jax.jit(lambda t, i: example_rows.gather(t, i, mesh))(tables, index)
  jax.tree.map(lambda g, h: np.testing.assert_array_equal(g, h[np.asarray(index)]), got, host)
  assert got['indices'].dtype == jnp.int16 and got['values'].dtype == jnp.bfloat16

  keep = jnp.array([True, True, True, True, False, True, True, True])
  values = {'indices': -got['indices'] - 1, 'values': -got['values'] - 1}
  written = jax.jit(lambda t, i, v, k: example_rows.scatter(t, i, v, k, mesh))(
      tables, index, values, keep
  )
  for name in host:
    expected = host[name].copy()
    for slot in [0, 1, 2, 3, 5, 6, 7]:  # in order: later duplicates overwrite earlier ones
      expected[int(index[slot])] = np.asarray(values[name][slot])
    np.testing.assert_array_equal(written[name], expected)
    assert written[name].dtype == host[name].dtype
