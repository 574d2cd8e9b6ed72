"""ImageNet-size data: random-resized crops, evaluation crops, host-streamed evaluation, and the
ImageNet configs on mocked TFDS imagenet2012."""

import importlib
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import runs
from skd_jax import config_lib
from skd_jax import evaluation
from skd_jax import train
from skd_jax.data import resized_crops
from skd_jax.data import sources
from skd_jax.data import streaming
from skd_jax.data import tfds_source
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


def test_the_boxes_of_a_fixed_seed_are_those_drawn_before_encoded_images_came():
  area, log_ratio, position = _draws(np.random.default_rng(0), 4)
  boxes = [resized_crops.random_resized_box(375, 500, *d) for d in zip(area, log_ratio, position)]
  assert boxes == [(22, 69, 346, 361), (6, 16, 363, 429), (79, 156, 145, 137), (13, 71, 352, 380)]


def _file(height, width, channels=3, fmt='JPEG', seed=0):
  """A photo-like image file: smooth colour blobs, stripes and noise; JPEG at quality 90, 4:2:0."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, channels), np.uint8)
  blobs = _pil(coarse).resize((width, height), Image.Resampling.BICUBIC)
  x = np.asarray(blobs, np.float64).reshape(height, width, channels)
  x += 20 * np.sin(np.arange(width) / 3.0)[None, :, None] + rng.normal(0, 6, x.shape)
  out = io.BytesIO()
  options = {'quality': 90, 'subsampling': '4:2:0'} if fmt == 'JPEG' else {}
  _pil(np.clip(x, 0, 255).astype(np.uint8)).save(out, fmt, **options)
  return resized_crops.Encoded(out.getvalue(), channels)


def _pil(x):
  return Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)


# A crop of an encoded JPEG decoded downscaled in the DCT domain: its mean absolute difference
# from the same box of the whole decode, resized, is at most this many levels of 255 (measured,
# both codecs alike: at most 1.6 over 20 seeds of these tests' files, 2.3 on the benchmark's
# photo-like 1024 x 768 JPEGs).
TOLERANCE = 3.0

# Both codecs where the jpeg extra is installed (the test extra installs it), Pillow's otherwise.
CODECS = [
    'pillow',
    pytest.param(
        'simplejpeg',
        marks=pytest.mark.skipif(
            resized_crops.simplejpeg is None, reason='the jpeg extra is not installed'
        ),
    ),
]


@pytest.fixture(params=CODECS)
def codec(request, monkeypatch):
  """The codec :class:`resized_crops.Encoded` images are decoded and resampled with."""
  monkeypatch.setenv(resized_crops.CODEC_ENV, request.param)
  assert resized_crops.codec() == request.param
  return request.param


def _resampling_bound(codec):
  """Most levels a crop of a whole decode may differ from PIL's resize of the decoded image:
  fast_image_resize computes PIL's weights but rounds its fixed-point sums otherwise."""
  return 0 if codec == 'pillow' else 1


def test_encoded_crops_are_the_decoded_images_crops_exactly_or_within_the_tolerance(codec):
  size = 48  # boxes from ~1.4 to 5 times the output: some decoded whole, some at 1/2 and 1/4
  encoded = [_file(240, 320, seed=0), _file(300, 200, seed=1)] * 6
  decoded = [resized_crops.decode(e) for e in encoded]
  assert decoded[0].shape == (240, 320, 3) and decoded[1].shape == (300, 200, 3)
  share = slice(3, 15)
  fast, full = (
      resized_crops.random_resized_crops(np.random.default_rng(5), x, share, 16, size, True)
      for x in (encoded, decoded)
  )
  area, log_ratio, position = (d[share] for d in _draws(np.random.default_rng(5), 16))
  shrunk = 0
  for i, image in enumerate(decoded):
    box = resized_crops.random_resized_box(*image.shape[:2], area[i], log_ratio[i], position[i])
    h, w = box[2:]
    difference = np.abs(fast[i].astype(np.int64) - full[i])
    if min(h, w) < 2 * size:  # decoded whole: the same pixels resampled alike
      assert difference.max() <= _resampling_bound(codec), (i, (h, w))
    else:
      shrunk += 1
      assert difference.mean() <= TOLERANCE, (i, (h, w), difference.mean())
  assert 0 < shrunk < len(encoded)


def test_encoded_evaluation_crops_are_the_decoded_images_within_the_tolerance(codec):
  for encoded in (_file(240, 320), _file(320, 240, seed=1)):
    decoded = resized_crops.decode(encoded)
    # Shorter side 240 -> 200: decoded whole, only the crop's pixels resampled (the box's
    # coordinates are floats: a level of rounding).
    fast, full = (resized_crops.resize_centre_crop(x, 200, 180) for x in (encoded, decoded))
    assert fast.shape == full.shape == (180, 180, 3)
    assert np.abs(fast.astype(np.int64) - full).max() <= 1
    # 240 -> 64: decoded at 1/2.
    fast, full = (resized_crops.resize_centre_crop(x, 64, 56) for x in (encoded, decoded))
    assert np.abs(fast.astype(np.int64) - full).mean() <= TOLERANCE


def test_both_codecs_decode_the_same_pixels_and_crop_the_same_boxes(codec):
  """A box at the output size is not resampled: both codecs give the whole decode's pixels; the
  sizes (hence the boxes) come from the header alike; flips mirror the crop exactly."""
  for channels in (3, 1):
    encoded = _file(200, 280, channels, seed=2)
    decoded = resized_crops.decode(encoded)
    assert resized_crops.dimensions(encoded) == decoded.shape[:2] == (200, 280)
    np.testing.assert_array_equal(
        resized_crops.resized_crop(encoded, (30, 50, 64, 64), 64), decoded[30:94, 50:114]
    )
  images = [_file(200, 280, seed=2)] * 4
  flipped, plain = (
      resized_crops.random_resized_crops(np.random.default_rng(3), images, slice(0, 4), 4, 32, f)
      for f in (True, False)
  )
  again = np.random.default_rng(3)
  _draws(again, 4)
  for i, coin in enumerate(again.random(4) < 0.5):
    np.testing.assert_array_equal(flipped[i], plain[i][:, ::-1] if coin else plain[i])


def test_files_libjpeg_turbo_does_not_decode_as_pillow_does_take_pillows_path(monkeypatch):
  """CMYK JPEGs and PNGs go through Pillow whatever the codec: the same pixels with both."""
  rgb = np.asarray(resized_crops.decode(_file(120, 160)))
  files = []
  for mode, fmt in (('CMYK', 'JPEG'), ('RGB', 'PNG')):
    out = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(out, fmt)
    files.append(resized_crops.Encoded(out.getvalue(), 3))
  crops = {}
  for codec_ in ('pillow', 'simplejpeg'):
    monkeypatch.setenv(resized_crops.CODEC_ENV, codec_)
    crops[codec_] = [resized_crops.resized_crop(f, (10, 20, 100, 120), 24) for f in files]
    assert [resized_crops.dimensions(f) for f in files] == [(120, 160)] * 2
  for pillow, other in zip(crops['pillow'], crops['simplejpeg']):
    np.testing.assert_array_equal(pillow, other)


def test_the_codec_is_the_jpeg_extras_unless_the_environment_says_pillow(monkeypatch):
  monkeypatch.delenv(resized_crops.CODEC_ENV, raising=False)
  installed = resized_crops.simplejpeg is not None
  assert resized_crops.codec() == ('simplejpeg' if installed else 'pillow')
  monkeypatch.setenv(resized_crops.CODEC_ENV, 'Pillow')
  assert resized_crops.codec() == 'pillow'


def test_encoded_grayscale_and_png_files_give_the_asked_channels(codec):
  gray = _file(120, 160, channels=1)
  assert resized_crops.decode(gray).shape == (120, 160, 1)
  as_rgb = resized_crops.Encoded(gray.data, 3)
  crop = resized_crops.resized_crop(as_rgb, (10, 20, 100, 100), 32)
  assert crop.shape == (32, 32, 3)  # grey repeated to RGB, as TFDS decodes it
  np.testing.assert_array_equal(crop[..., 0], crop[..., 2])
  np.testing.assert_array_equal(
      resized_crops.resized_crop(gray, (10, 20, 100, 100), 32), crop[..., :1]
  )
  png = _file(120, 160, fmt='PNG')  # no DCT downscale: always the whole decode's crop
  np.testing.assert_array_equal(
      resized_crops.resized_crop(png, (0, 0, 120, 160), 24),
      resized_crops.resized_crop(resized_crops.decode(png), (0, 0, 120, 160), 24),
  )


def test_tfds_records_of_variable_size_read_the_files_encoded():
  jpeg = _file(30, 40)
  stored = tfds_source._stored_image(jpeg.data, 3)  # pylint: disable=protected-access
  assert stored == jpeg and resized_crops.decode(stored).shape == (30, 40, 3)
  mocked = np.zeros((5, 6, 3), np.uint8)  # what tfds.testing.mock_data hands over
  assert tfds_source._stored_image(mocked, 3) is mocked  # pylint: disable=protected-access
  with tfds.testing.mock_data(num_examples=3):
    records = tfds_source.TfdsRecords(
        'imagenet2012', 'train', data_dir=None, download=False, variable_size=True
    )
    images, labels = records.read(np.array([2, 0]))
    source = tfds.data_source('imagenet2012', split='train', download=False)
    for image, i in zip(images, (2, 0)):
      np.testing.assert_array_equal(image, source[i]['image'])
    np.testing.assert_array_equal(labels, [source[2]['label'], source[0]['label']])


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
  device_set = sources.DeviceEvalSet(sources.to_devices(images, labels, mesh), B)
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


def test_the_two_imagenet_configs_differ_in_their_model_alone():
  """So training the ResNet-50 one (below) covers both; ResNet-152 itself is in test_models."""
  r152, r50 = (config_lib.flatten(_imagenet_config(a)) for a in ('imagenet', 'imagenet_resnet50'))
  assert {k for k in r152 if r152[k] != r50.get(k)} == {'model.name'} and r152.keys() == r50.keys()
  assert (r152['model.name'], r50['model.name']) == ('resnet152', 'resnet50')


# On 8 devices (the sharded host stream and evaluation, which do not depend on the network):
# about 1.5 minutes on a quiet 2-core CPU, mostly compilation. Training the ResNet-152 config as
# well, on 1 device, cost another 2-3 minutes and tested nothing this and the test above do not.
@pytest.mark.slow
def test_the_imagenet_config_trains_on_mocked_imagenet2012(tmp_path):
  c = _imagenet_config('imagenet_resnet50')
  assert (c.data.pipeline, c.data.augment, c.model.dtype) == ('host', 'imagenet', 'bfloat16')
  with tfds.testing.mock_data(num_examples=16):  # 2 steps, 1 evaluation batch
    # The mock draws images of random sizes, as ImageNet's are.
    source = tfds.data_source('imagenet2012', split='train', download=False)
    assert len({source[i]['image'].shape for i in range(5)}) > 1
    summary = train.train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:8])
  assert summary['steps'] == 2 and summary['epochs'] == 1
  trains = runs.records(tmp_path, 'train')
  assert len(trains) == 2 and all(np.isfinite(r['loss']) for r in trains)
  assert 0 <= summary['top1'] <= 100
