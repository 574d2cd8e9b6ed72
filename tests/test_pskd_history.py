"""PS-KD's history storage: top-k compression closed forms, the term in every format, bad settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import losses
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError
from skd_jax.terms import pskd

BF16_ROUNDING = 2.0**-8  # largest relative error of rounding a float32 to the nearest bfloat16


def _probs(key=0, batch=6, classes=7):
  return jax.nn.softmax(2 * jax.random.normal(jax.random.key(key), (batch, classes)))


def test_compress_keeps_the_k_largest_in_decreasing_order():
  probs = _probs()
  indices, values = losses.compress_top_k(probs, k=3)
  assert indices.dtype == jnp.int16 and values.dtype == jnp.bfloat16
  expected = np.argsort(-np.asarray(probs), axis=-1, kind='stable')[:, :3]
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(
      values, np.take_along_axis(np.asarray(probs), expected, -1).astype(jnp.bfloat16)
  )


def test_compress_breaks_ties_by_the_lower_class():
  indices, _ = losses.compress_top_k(jnp.array([[0.25, 0.25, 0.25, 0.25], [0, 0, 1.0, 0]]), k=3)
  np.testing.assert_array_equal(indices, [[0, 1, 2], [2, 0, 1]])


def test_expand_spreads_the_remaining_mass_uniformly_over_the_other_classes():
  got = losses.expand_top_k(jnp.array([[3, 0]]), jnp.array([[0.5, 0.25]]), num_classes=6)
  np.testing.assert_array_equal(got, [[0.25, 0.0625, 0.0625, 0.5, 0.0625, 0.0625]])


def test_expand_with_k_one_less_than_the_classes_gives_the_rest_to_the_last_class():
  got = losses.expand_top_k(jnp.array([[2, 0]]), jnp.array([[0.5, 0.25]]), num_classes=3)
  np.testing.assert_array_equal(got, [[0.25, 0.25, 0.5]])


def test_expand_normalises_values_that_sum_above_one():
  got = losses.expand_top_k(jnp.array([[0, 1]]), jnp.array([[0.75, 0.5]]), num_classes=3)
  np.testing.assert_allclose(got, [[0.6, 0.4, 0.0]], rtol=1e-7)


@pytest.mark.parametrize('k', [1, 3, 6])
def test_round_trip_sums_to_one_and_keeps_the_top_k_to_bfloat16_precision(k):
  probs = _probs(key=k)
  dense = losses.expand_top_k(*losses.compress_top_k(probs, k=k), num_classes=7)
  np.testing.assert_allclose(dense.sum(-1), 1.0, rtol=1e-6)
  kept = np.argsort(-np.asarray(probs), axis=-1, kind='stable')[:, :k]
  np.testing.assert_allclose(
      np.take_along_axis(np.asarray(dense), kept, -1),
      np.take_along_axis(np.asarray(probs), kept, -1),
      rtol=2 * BF16_ROUNDING,  # value rounding, and at most as much from normalising their sum
  )


def test_bad_k_or_shapes_are_refused():
  with pytest.raises(ValueError, match=r'k: expected an integer in \[1, 6\], got 7'):
    losses.compress_top_k(_probs(), k=7)
  with pytest.raises(ValueError, match='1 <= k < num_classes = 3'):
    losses.expand_top_k(jnp.zeros((1, 3), jnp.int16), jnp.zeros((1, 3)), num_classes=3)


def test_class_indices_are_int16_up_to_32767_classes_then_int32():
  assert losses.index_dtype(32767) == jnp.int16 and losses.index_dtype(32768) == jnp.int32
  term = pskd.PSKD(num_classes=40000, num_epochs=1, storage='top_k')
  shapes = jax.eval_shape(term.init_rows, jax.ShapeDtypeStruct((10,), jnp.int32))
  assert shapes['indices'].dtype == jnp.int32 and shapes['indices'].shape == (10, 5)


def _term(storage, classes=7, k=3):
  return pskd.PSKD(num_classes=classes, num_epochs=4, storage=storage, top_k=k)


@pytest.mark.parametrize('storage', pskd.STORAGES)
def test_initial_rows_are_the_encoded_one_hot_labels_and_decode_to_them_exactly(storage):
  term, labels = _term(storage), jnp.array([0, 3, 6, 2])
  one_hot = jax.nn.one_hot(labels, 7)
  rows = term.init_rows(labels)
  jax.tree.map(np.testing.assert_array_equal, rows, term.encode(one_hot))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.dtype, b.dtype), rows, term.encode(one_hot))
  np.testing.assert_array_equal(term.decode(rows), one_hot)


def _dense_reference(storage, rows):
  """The history rows as probabilities, computed with NumPy from the stored form."""
  if storage == 'float32':
    return np.asarray(rows)
  if storage == 'bfloat16':
    rows = np.asarray(rows, np.float64)
    return rows / rows.sum(-1, keepdims=True)
  indices, values = np.asarray(rows['indices']), np.asarray(rows['values'], np.float64)
  dense = np.tile(((1 - values.sum(-1)) / (7 - 3))[:, None], (1, 7))
  np.put_along_axis(dense, indices.astype(np.int64), values, -1)
  return dense


@pytest.mark.parametrize('storage', pskd.STORAGES)
def test_the_term_trains_on_the_decoded_history_and_returns_encoded_predictions(storage):
  term = _term(storage)
  logits = 3 * jax.random.normal(jax.random.key(1), (6, 7))
  inputs = terms_lib.TermInputs(logits=logits, labels=jnp.arange(6), epoch=1)
  rows = term.encode(_probs(key=2))
  out = term(inputs, rows)
  alpha = 0.8 * 2 / 4
  targets = (1 - alpha) * np.eye(7)[:6] + alpha * _dense_reference(storage, rows)
  log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)
  np.testing.assert_allclose(out.loss, -(targets * log_p).sum(-1), rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, out.rows, term.encode(jax.nn.softmax(logits)))
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), out.rows, rows)


def test_float32_storage_is_the_plain_history_bit_for_bit():
  term, past = _term('float32'), _probs(key=2)
  logits = 3 * jax.random.normal(jax.random.key(1), (6, 7))
  inputs = terms_lib.TermInputs(logits=logits, labels=jnp.arange(6), epoch=1)
  out = term(inputs, past)
  expected = losses.pskd_cross_entropy(logits, inputs.one_hot, past, alpha=0.4)
  np.testing.assert_array_equal(out.loss, expected)
  np.testing.assert_array_equal(out.rows, jax.nn.softmax(logits))
  assert term.init_rows(jnp.arange(3)).dtype == jnp.float32


def test_bfloat16_history_is_within_rounding_of_the_predictions():
  probs = _probs(key=3, batch=64, classes=100)
  term = _term('bfloat16', classes=100)
  decoded = term.decode(term.encode(probs))
  np.testing.assert_allclose(decoded.sum(-1), 1.0, rtol=1e-6)
  # Each entry is rounded once (2^-8) and divided by a sum rounded at most as much.
  np.testing.assert_allclose(decoded, probs, rtol=2.01 * BF16_ROUNDING, atol=0)


def _build(**pskd_settings):
  context = terms_lib.Context(num_classes=10, num_epochs=4, batch_size=8)
  return terms_lib.build(
      ml_collections.ConfigDict({'pskd': dict(weight=1.0, alpha_T=0.8, **pskd_settings)}), context
  )


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(storage='fp8'), "loss.pskd.storage: expected one of 'float32', 'bfloat16', 'top_k'"),
        (dict(storage='top_k', top_k=0), r'loss.pskd.top_k: expected an integer >= 1, got 0'),
        (
            dict(storage='top_k', top_k=10),
            r'loss.pskd.top_k: .*\(fewer than the 10 classes\), got 10$',
        ),
        (dict(storage='top_k', top_k=2.5), r'loss.pskd.top_k: expected an integer'),
    ],
)
def test_bad_storage_settings_are_one_line_config_errors(settings, message):
  with pytest.raises(ConfigError, match=message) as error:
    _build(**settings)
  assert '\n' not in str(error.value)


def test_storage_settings_reach_the_term():
  (term,) = _build(storage='top_k', top_k=4).terms
  assert (term.storage, term.top_k) == ('top_k', 4)
  assert _build().terms[0].storage == 'float32'


def test_the_memory_benchmark_measures_the_padded_tables():
  from benchmarks import history_memory  # pylint: disable=g-import-not-at-top

  # 37 examples on 8 devices: 40 rows, 5 per device.
  assert history_memory.history_bytes(37, 10, 'float32', 5, 8) == (5 * 10 * 4, 40 * 10 * 4)
  assert history_memory.history_bytes(37, 10, 'bfloat16', 5, 8) == (5 * 10 * 2, 40 * 10 * 2)
  assert history_memory.history_bytes(37, 10, 'top_k', 3, 8) == (5 * 3 * 4, 40 * 3 * 4)
  rows = -(-14_197_122 // 256)
  assert history_memory.history_bytes(14_197_122, 21_841, 'top_k', 5, 256)[0] == rows * 5 * 4
  assert history_memory.history_bytes(1_281_167, 1000, 'top_k', 5, 1)[1] <= 50e6  # the goal
