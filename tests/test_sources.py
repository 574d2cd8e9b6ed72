"""The on-device batch source and its samplers: what every step's batch holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import train
from skd_jax.data import samplers
from skd_jax.data import sources

N, B, CLASSES = 72, 16, 5  # 72 / 16 = 4.5: the last batch of every epoch is padded
SPE = 5
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (N, 8, 8, 1)).astype(np.uint8)
LABELS = RNG.integers(0, CLASSES, N)


def _source(devices=8, groups=('partner', 'previous'), seed=0, **augment):
  mesh = train.make_mesh(jax.devices()[:devices])
  return sources.OnDeviceSource(
      IMAGES, LABELS, CLASSES, mesh, seed=seed, batch_size=B, groups=groups, **augment
  )


def _batch(source, step):
  batch = source.batch(jnp.int32(step), *source.step_args(step))
  return jax.tree.map(np.asarray, batch)


def test_every_example_appears_once_per_epoch_and_padding_is_marked():
  source = _source()
  assert source.steps_per_epoch == SPE
  orders = []
  for epoch in range(2):
    mains = [_batch(source, epoch * SPE + s)['main'] for s in range(SPE)]
    seen = np.concatenate([m.index[m.valid] for m in mains])
    np.testing.assert_array_equal(np.sort(seen), np.arange(N))
    assert [int(m.valid.sum()) for m in mains] == [16, 16, 16, 16, 8]
    np.testing.assert_array_equal(mains[0].labels, LABELS[mains[0].index])
    orders.append(seen)
  assert not np.array_equal(orders[0], orders[1])  # a new permutation every epoch


def test_a_batch_depends_on_the_step_alone_and_not_on_the_device_count():
  walked = _source()
  for step in range(8):
    _batch(walked, step)
  for other in (_source(), _source(devices=1)):  # fresh: straight to step 7
    for got, want in zip(jax.tree.leaves(_batch(other, 7)), jax.tree.leaves(_batch(walked, 7))):
      np.testing.assert_array_equal(got, want)
  assert not np.array_equal(
      _batch(_source(seed=1), 7)['main'].index, _batch(walked, 7)['main'].index
  )


def test_partners_share_the_anchors_class_and_are_drawn_with_replacement():
  source = _source()
  drawn = []
  for step in range(10 * SPE):
    batch = _batch(source, step)
    np.testing.assert_array_equal(LABELS[batch['partner'].index], batch['main'].labels)
    np.testing.assert_array_equal(batch['partner'].labels, batch['main'].labels)
    drawn.append(batch['partner'].index)
  drawn = np.concatenate(drawn)
  # With replacement: repeats occur; uniform within the class: every member of a class is drawn.
  assert len(np.unique(drawn)) < len(drawn)
  assert set(np.unique(drawn)) == set(range(N))


def test_a_class_with_one_example_partners_it_with_itself():
  labels = np.array([0, 1, 1, 1, 2, 2, 2, 2])
  classes = samplers.class_index(labels, 4)
  partners = samplers.class_partners(jax.random.key(0), jnp.array([0, 0, 1, 2]), classes)
  assert partners[0] == partners[1] == 0
  assert partners[2] in (1, 2, 3) and partners[3] in (4, 5, 6, 7)


def test_the_previous_group_is_the_previous_steps_main_examples_across_epochs():
  source = _source(crop_padding=2, flip=True)
  first = _batch(source, 0)['previous']
  assert not first.valid.any()  # no previous step at a run's first step
  for step in (1, 4, 5, 6, 10):  # 5 and 10 start an epoch: the previous step is in the last one
    before, now = _batch(source, step - 1)['main'], _batch(source, step)['previous']
    np.testing.assert_array_equal(now.index, before.index)
    np.testing.assert_array_equal(now.valid, before.valid)
    np.testing.assert_array_equal(now.labels, before.labels)
  # The same examples under a new augmentation.
  assert not np.array_equal(now.images, before.images)


def test_groups_are_sharded_along_the_data_axis():
  source = _source()
  batch = source.batch(jnp.int32(3), *source.step_args(3))
  for group in batch.values():
    assert group.images.sharding.spec[0] == 'data'


def test_unknown_groups_are_refused():
  with pytest.raises(ValueError, match=r"groups: unknown \['neighbours'\]"):
    _source(groups=('neighbours',))


def _augmentations(image, padding):
  """Every crop-after-zero-padding and flip of ``image``."""
  h, w, _ = image.shape
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [
      padded[y : y + h, x : x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)
  ]
  return crops + [c[:, ::-1] for c in crops]


def check_again_group(batch, images, padding):
  """``'again'``: the main examples, each image an independent crop and flip of the raw image
  (not of the main group's augmented one); returns how many differ from the main group's."""
  get = lambda examples, key: getattr(examples, key) if hasattr(examples, key) else examples[key]
  main, again = batch['main'], batch['again']
  for key in ('index', 'valid', 'labels'):
    np.testing.assert_array_equal(get(again, key), get(main, key))
  differ = 0
  for i, index in enumerate(get(main, 'index')):
    options = _augmentations(images[index], padding)
    for group in (main, again):
      assert any(np.array_equal(get(group, 'images')[i], o) for o in options)
    differ += not np.array_equal(get(main, 'images')[i], get(again, 'images')[i])
  return differ


def test_the_again_group_is_a_second_independent_augmentation_of_the_main_examples():
  source = _source(groups=('again',), crop_padding=2, flip=True)
  batch = _batch(source, 3)
  assert check_again_group(batch, IMAGES, 2) >= B // 2
  # Deterministic per (seed, step): a fresh source gives the same second draw.
  fresh = _batch(_source(groups=('again',), crop_padding=2, flip=True), 3)
  np.testing.assert_array_equal(fresh['again'].images, batch['again'].images)
