"""ImageNet-size data: random-resized crops, evaluation crops, host-streamed evaluation, and the
ImageNet configs on mocked TFDS imagenet2012."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import runs
from skd_jax import evaluation
from skd_jax import train
from skd_jax.data import resized_crops
from skd_jax.data import sources
from skd_jax.data import streaming
from skd_jax.errors import ConfigError

B = 8


def _draws(rng, n=1):
  area = rng.uniform(*resized_crops.SCALE, (n, resized_crops.ATTEMPTS))
  log_ratio = rng.uniform(*np.log(resized_crops.RATIO), (n, resized_crops.ATTEMPTS))
  return area, log_ratio, rng.random((n, resized_crops.ATTEMPTS, 2))


@pytest.mark.parametrize('height,width', [(375, 500), (500, 333), (17, 47), (224, 224), (12, 300)])
def test_random_resized_boxes_stay_inside_with_area_and_ratio_in_range(height, width):
  rng = np.random.default_rng(0)
  area, log_ratio, position = _draws(rng, 500)
  fitted = 0
  for a, r, p in zip(area, log_ratio, position):
    top, left, h, w = resized_crops.random_resized_box(height, width, a, r, p)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    # The first attempt whose rounded box fits is the one taken.
    first = next((k for k in range(len(a)) if _fits(height, width, a[k], r[k])), None)
    if first is None:  # centre crop of the whole image, clipped to the ratio range
      assert (top, left) == ((height - h) // 2, (width - w) // 2)
      assert h == height or w == width
      continue
    fitted += 1
    # Rounding to whole pixels moves the area and the ratio by at most half a pixel per side.
    assert h * w == pytest.approx(a[first] * height * width, rel=0, abs=(h + w) / 2 + 1)
    assert w / h == pytest.approx(math.exp(r[first]), rel=1 / min(h, w) + 1e-9)
  # No box of the allowed areas and ratios fits a 12 x 300 strip: always the fallback.
  assert (fitted > 0) == ((height, width) != (12, 300))


def _fits(height, width, area, log_ratio):
  target, ratio = height * width * area, math.exp(log_ratio)
  w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
  return 0 < w <= width and 0 < h <= height


def test_the_fallback_is_the_centre_crop_clipped_to_the_ratio_range():
  never = np.ones(resized_crops.ATTEMPTS)  # the whole area at the widest ratio never fits a strip
  position = np.zeros((resized_crops.ATTEMPTS, 2))
  wide = resized_crops.random_resized_box(100, 400, never, np.log(never * 4 / 3), position)
  assert wide == (0, (400 - 133) // 2, 100, 133)
  tall = resized_crops.random_resized_box(400, 100, never, np.log(never * 4 / 3), position)
  assert tall == ((400 - 133) // 2, 0, 133, 100)


def test_a_resized_crop_at_its_own_size_is_the_box_and_grayscale_keeps_one_channel():
  image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
  np.testing.assert_array_equal(
      resized_crops.resized_crop(image, (5, 7, 10, 10), 10), image[5:15, 7:17]
  )
  assert resized_crops.resized_crop(image, (0, 0, 20, 30), 16).shape == (16, 16, 3)
  gray = resized_crops.resized_crop(image[..., :1], (5, 7, 10, 10), 10)
  np.testing.assert_array_equal(gray, image[5:15, 7:17, :1])


def test_random_resized_crops_flip_with_the_drawn_coin_and_depend_on_the_seed_alone():
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(40, 60), (33, 17), (50, 50)]]
  share = slice(2, 5)
  flipped = resized_crops.random_resized_crops(np.random.default_rng(7), images, share, B, 16, True)
  plain = resized_crops.random_resized_crops(np.random.default_rng(7), images, share, B, 16, False)
  assert flipped.shape == (3, 16, 16, 3) and flipped.dtype == np.uint8
  again = np.random.default_rng(7)
  _draws(again, B)
  coins = (again.random(B) < 0.5)[share]
  for i, coin in enumerate(coins):
    np.testing.assert_array_equal(flipped[i], plain[i][:, ::-1] if coin else plain[i])
  same = resized_crops.random_resized_crops(np.random.default_rng(7), images, share, B, 16, True)
  np.testing.assert_array_equal(same, flipped)
  other = resized_crops.random_resized_crops(np.random.default_rng(8), images, share, B, 16, True)
  assert not np.array_equal(other, flipped)


def test_evaluation_resizes_the_shorter_side_and_takes_the_centre_crop():
  rng = np.random.default_rng(0)
  # Shorter side already 256: no resampling, the crop is the centre 224 x 224.
  image = rng.integers(0, 256, (256, 320, 3), np.uint8)
  np.testing.assert_array_equal(
      resized_crops.resize_centre_crop(image, 256, 224), image[16:240, 48:272]
  )
  np.testing.assert_array_equal(
      resized_crops.resize_centre_crop(image.transpose(1, 0, 2), 256, 224),
      image.transpose(1, 0, 2)[48:272, 16:240],
  )
  # Halving a 2x2-block image: the left half red, the right half blue survive the resize.
  halves = np.zeros((512, 600, 3), np.uint8)
  halves[:, :300, 0] = 255
  halves[:, 300:, 2] = 255
  crop = resized_crops.resize_centre_crop(halves, 256, 224)
  assert crop.shape == (224, 224, 3)
  # 512 x 600 -> 256 x 300; the crop starts at column 38, the colours meet at column 150 - 38.
  assert np.all(crop[:, : 150 - 38 - 1] == [255, 0, 0])
  assert np.all(crop[:, 150 - 38 + 1 :] == [0, 0, 255])


class _VariableRecords:
  """Records of variable-size RGB images that remember which examples were read."""

  num_classes = 5
  image_shape = (None, None, 3)

  def __init__(self, n=20):
    rng = np.random.default_rng(0)
    self.images = [
        rng.integers(0, 256, (rng.integers(8, 40), rng.integers(8, 40), 3), np.uint8)
        for _ in range(n)
    ]
    self.labels = rng.integers(0, 5, n).astype(np.int32)
    self.read_indices = []

  def __len__(self):
    return len(self.labels)

  def read(self, index):
    self.read_indices.extend(int(i) for i in index)
    return [self.images[i] for i in index], self.labels[index]


def _reader(records, share=slice(0, B), seed=0):
  return streaming.StepReader(
      records,
      seed=seed,
      batch_size=B,
      groups=('main', 'previous'),
      crop_padding=0,
      flip=True,
      share=share,
      augment='imagenet',
      image_size=12,
  )


def test_imagenet_crops_depend_on_seed_and_step_only_and_not_on_the_process_count():
  whole = _reader(_VariableRecords())(3)
  assert whole['main']['images'].shape == (B, 12, 12, 3)
  shares = []
  for share in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):  # four processes
    records = _VariableRecords()
    shares.append(_reader(records, share)(3))
    wanted = np.concatenate([shares[-1][g]['index'] for g in ('main', 'previous')])
    assert sorted(records.read_indices) == sorted(wanted.tolist())
  for group in ('main', 'previous'):
    for key in ('index', 'valid', 'labels', 'images'):
      np.testing.assert_array_equal(
          np.concatenate([s[group][key] for s in shares]), whole[group][key]
      )
  np.testing.assert_array_equal(
      _reader(_VariableRecords())(3)['main']['images'], whole['main']['images']
  )
  assert not np.array_equal(
      _reader(_VariableRecords())(4)['main']['images'], whole['main']['images']
  )
  assert not np.array_equal(
      _reader(_VariableRecords(), seed=1)(3)['main']['images'], whole['main']['images']
  )


class _Networks:
  """A stand-in for ``skd_jax.networks.Networks``: logits linear in the mean of each channel."""

  @staticmethod
  def apply_inference(variables, images):
    x = images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0
    return x @ variables, None


def test_host_streamed_evaluation_gives_the_on_device_metrics_and_shares_make_each_batch():
  # 21 examples in batches of 8: the last batch is padded.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (21, 6, 6, 3), np.uint8)
  labels = rng.integers(0, 4, 21).astype(np.int32)

  class Records:

    def __len__(self):
      return len(labels)

    def read(self, index):
      return images[index], labels[index]

  mesh = train.make_mesh(jax.devices()[:8])
  weights = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  device_set = evaluation.DeviceEvalSet(sources.to_devices(images, labels, mesh), B)
  device_fn = jax.jit(
      lambda v, *a: evaluation.eval_step(v, *a, networks=_Networks, mesh=mesh, batch_size=B)
  )
  host_set = streaming.HostEvalSet(Records(), mesh, batch_size=B, transform=np.asarray)
  host_fn = jax.jit(lambda v, *a: evaluation.eval_batch(v, *a, networks=_Networks))
  models = {'': weights, 'ema/': 2 * weights}
  expected = evaluation.evaluate(device_fn, device_set, models)
  assert evaluation.evaluate(host_fn, host_set, models) == expected
  assert set(expected) >= {'top1', 'nll', 'ema/top1', 'ema/nll'}
  for b in range(host_set.num_batches):  # two processes' shares make each batch
    whole = streaming.EvalBatchReader(
        Records(), batch_size=B, transform=np.asarray, share=slice(0, B)
    )(b)
    halves = [
        streaming.EvalBatchReader(Records(), batch_size=B, transform=np.asarray, share=s)(b)
        for s in (slice(0, 4), slice(4, 8))
    ]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
  assert whole['valid'].sum() == 21 - 2 * B


def test_imagenet_augmentation_needs_the_host_pipeline_and_no_padding():
  c = importlib.import_module('configs.pskd').get_config('imagenet')
  c.data.pipeline = 'device'
  with pytest.raises(ConfigError, match=r"^data\.augment: 'imagenet' needs data\.pipeline='host'"):
    train.build_job(c, jax.devices()[:1])
  c = importlib.import_module('configs.pskd').get_config('imagenet')
  c.data.eval_resize = 200
  with pytest.raises(ConfigError, match=r'^data\.eval_resize: expected an integer >= 224'):
    train.build_job(c, jax.devices()[:1])


def _imagenet_config(arg):
  """``configs/pskd.py:<arg>`` as it is, but for 32-pixel crops of batches of 8, one epoch."""
  c = importlib.import_module('configs.pskd').get_config(arg)
  c.data.dir, c.data.workers = '', 0
  c.data.image_size, c.data.eval_resize = 32, 36
  c.batch_size, c.eval_batch_size, c.num_epochs = 8, 16, 1
  c.optim.boundaries = ()  # milestones must lie inside the single epoch
  c.optim.lr *= c.batch_size / 256  # the linear scaling rule: the protocol's lr at batch 8
  c.log_every_steps = 1
  return c


# Both configs on 1 device and on 8 (the sharded host stream and evaluation): about 4 minutes on
# a quiet 2-core CPU, mostly compilation.
@pytest.mark.slow
@pytest.mark.parametrize('devices', [1, 8])
@pytest.mark.parametrize('arg', ['imagenet_resnet50', 'imagenet'])
def test_the_imagenet_configs_train_on_mocked_imagenet2012(arg, devices, tmp_path):
  c = _imagenet_config(arg)
  assert (c.data.pipeline, c.data.augment, c.model.dtype) == ('host', 'imagenet', 'bfloat16')
  assert c.model.name == ('resnet50' if arg == 'imagenet_resnet50' else 'resnet152')
  with tfds.testing.mock_data(num_examples=16):  # 2 steps, 1 evaluation batch
    # The mock draws images of random sizes, as ImageNet's are.
    source = tfds.data_source('imagenet2012', split='train', download=False)
    assert len({source[i]['image'].shape for i in range(5)}) > 1
    summary = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:devices])
  assert summary['steps'] == 2 and summary['epochs'] == 1
  trains = runs.records(tmp_path, 'train')
  assert len(trains) == 2 and all(np.isfinite(r['loss']) for r in trains)
  assert 0 <= summary['top1'] <= 100
