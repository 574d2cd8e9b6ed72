"""Tests for skd_jax.data: IDX files, Fashion-MNIST and TFDS sources."""

import gzip
import io
import os
import pathlib
import re
import struct
import subprocess
import sys
import time
import types

import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from skd_jax import data
from skd_jax.data import idx
from skd_jax.data import resized_crops
from skd_jax.data import tfds_source
from skd_jax.errors import ConfigError

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_IDX_CODES = {
    np.dtype('u1'): 0x08,
    np.dtype('i1'): 0x09,
    np.dtype('>i2'): 0x0B,
    np.dtype('>i4'): 0x0C,
    np.dtype('>f4'): 0x0D,
    np.dtype('>f8'): 0x0E,
}


def _idx_bytes(array: np.ndarray) -> bytes:
  """Encodes `array` in the IDX format, independently of the reader."""
  big = array.astype(array.dtype.newbyteorder('>'))
  header = bytes([0, 0, _IDX_CODES[big.dtype], array.ndim])
  header += b''.join(struct.pack('>I', d) for d in array.shape)
  return header + big.tobytes()


def _write_idx(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
  raw = _idx_bytes(array)
  path.write_bytes(gzip.compress(raw) if path.suffix == '.gz' else raw)
  return path


def _write_fashion_split(directory, split, images, labels, gz=True):
  prefix = {'train': 'train', 'test': 't10k'}[split]
  suffix = '.gz' if gz else ''
  _write_idx(directory / f'{prefix}-images-idx3-ubyte{suffix}', images)
  _write_idx(directory / f'{prefix}-labels-idx1-ubyte{suffix}', labels)


def _config(**kwargs):
  fields = dict(source='tfds', name='cifar10', dir='', download=False)
  fields.update(kwargs)
  return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------- read_idx


@pytest.mark.parametrize('name', ['x-idx3-ubyte', 'x-idx3-ubyte.gz'])
def test_read_idx_roundtrips_uint8(tmp_path, name):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
  path = _write_idx(tmp_path / name, images)
  out = idx.read_idx(path)
  assert out.dtype == np.uint8
  np.testing.assert_array_equal(out, images)
  out[0, 0, 0] = 7  # The result must be a writable copy, not a file view.


@pytest.mark.parametrize('dtype', ['i1', '>i2', '>i4', '>f4', '>f8'])
def test_read_idx_roundtrips_multibyte_big_endian(tmp_path, dtype):
  values = (np.arange(24).reshape(2, 3, 4) - 11).astype(dtype)
  out = idx.read_idx(_write_idx(tmp_path / 'v.gz', values))
  assert out.dtype == np.dtype(dtype).newbyteorder('=')
  np.testing.assert_array_equal(out, values)


def test_read_idx_detects_gzip_by_content(tmp_path):
  labels = np.arange(10, dtype=np.uint8)
  path = tmp_path / 'labels-idx1-ubyte'  # gzip data without a .gz name.
  path.write_bytes(gzip.compress(_idx_bytes(labels)))
  np.testing.assert_array_equal(idx.read_idx(path), labels)


@pytest.mark.parametrize(
    'mangle',
    [
        lambda b: b[:-1],  # Truncated data.
        lambda b: b + b'\0',  # Trailing bytes.
        lambda b: b[:6],  # Truncated header.
        lambda b: b'\1' + b[1:],  # Bad magic.
        lambda b: b[:2] + b'\x07' + b[3:],  # Unknown dtype code.
        lambda b: b'',  # Empty file.
    ],
)
@pytest.mark.parametrize('gz', [False, True])
def test_read_idx_rejects_corrupt_files(tmp_path, mangle, gz):
  raw = mangle(_idx_bytes(np.zeros((4, 2, 2), np.uint8)))
  path = tmp_path / ('bad.gz' if gz else 'bad')
  path.write_bytes(gzip.compress(raw) if gz else raw)
  with pytest.raises(ConfigError, match=re.escape(f'{path}: ')) as e:
    idx.read_idx(path)
  assert '\n' not in str(e.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
  path = tmp_path / 'x.gz'
  compressed = gzip.compress(_idx_bytes(np.ones((50, 28, 28), np.uint8)))
  path.write_bytes(compressed[: len(compressed) // 2])
  expected = re.escape(f'{path}: corrupt or truncated gzip')
  with pytest.raises(ConfigError, match=expected):
    idx.read_idx(path)


def test_read_idx_missing_file_names_it(tmp_path):
  path = tmp_path / 'nope-idx1-ubyte'
  expected = re.escape(f'{path}: no such file')
  with pytest.raises(ConfigError, match=expected):
    idx.read_idx(path)


def test_an_idx_file_truncated_during_a_run_is_one_input_error_not_sigbus(tmp_path):
  images = np.arange(50 * 28 * 28).reshape(50, 28, 28).astype(np.uint8)
  _write_fashion_split(tmp_path, 'train', images, np.zeros(50, np.uint8), gz=False)
  path = tmp_path / 'train-images-idx3-ubyte'
  # In a subprocess: a memory-mapped file cut short kills the process reading it with SIGBUS.
  script = f"""if True:
    import os
    import numpy as np
    from skd_jax.data import idx
    records = idx.FashionMnistRecords({str(tmp_path)!r}, 'train')
    assert (records.read(np.array([49, 3]))[0][..., 0] == np.load({str(tmp_path / 'x.npy')!r})).all()
    os.truncate({str(path)!r}, 16 + 10 * 28 * 28)
    print(records.read(np.array([3]))[0].sum())
    try:
      records.read(np.array([3, 20]))
    except Exception as e:
      print(type(e).__name__, e)
  """
  np.save(tmp_path / 'x.npy', images[[49, 3]])
  result = subprocess.run(
      [sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=False
  )
  assert result.returncode == 0, result
  assert result.stdout.splitlines() == [
      str(images[3].sum()),
      f'InputError {path}: row 20 lies past the end of the file ({16 + 10 * 28 * 28} bytes, '
      f'{16 + 50 * 28 * 28} when the run opened it): the file was truncated during the run; '
      'restore it and rerun to continue',
  ]


# ------------------------------------------------------ load_fashion_mnist


@pytest.mark.parametrize('gz', [False, True])
def test_load_fashion_mnist_from_written_files(tmp_path, gz):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(7,), dtype=np.uint8)
  _write_fashion_split(tmp_path, 'test', images, labels, gz=gz)
  out_images, out_labels = idx.load_fashion_mnist(str(tmp_path), 'test')
  assert out_images.shape == (7, 28, 28, 1) and out_images.dtype == np.uint8
  assert out_labels.dtype == np.int32
  np.testing.assert_array_equal(out_images[..., 0], images)
  np.testing.assert_array_equal(out_labels, labels)


def test_load_fashion_mnist_missing_file_names_it(tmp_path):
  _write_idx(tmp_path / 'train-images-idx3-ubyte.gz', np.zeros((3, 28, 28), np.uint8))
  with pytest.raises(ConfigError, match='train-labels-idx1-ubyte'):
    idx.load_fashion_mnist(str(tmp_path), 'train')


def test_load_fashion_mnist_count_mismatch(tmp_path):
  _write_fashion_split(tmp_path, 'train', np.zeros((3, 28, 28), np.uint8), np.zeros((4,), np.uint8))
  with pytest.raises(ConfigError, match='4 labels for 3 images'):
    idx.load_fashion_mnist(str(tmp_path), 'train')


def test_load_fashion_mnist_wrong_image_shape(tmp_path):
  _write_fashion_split(tmp_path, 'train', np.zeros((3, 32, 32), np.uint8), np.zeros((3,), np.uint8))
  with pytest.raises(ConfigError, match=r'expected uint8 images of shape'):
    idx.load_fashion_mnist(str(tmp_path), 'train')


def test_load_fashion_mnist_label_out_of_range(tmp_path):
  _write_fashion_split(
      tmp_path, 'train', np.zeros((2, 28, 28), np.uint8), np.array([3, 10], np.uint8)
  )
  with pytest.raises(ConfigError, match=r'label 10 out of range'):
    idx.load_fashion_mnist(str(tmp_path), 'train')


def test_load_fashion_mnist_unknown_split(tmp_path):
  with pytest.raises(ConfigError, match=r"^split: expected 'train' or 'test'"):
    idx.load_fashion_mnist(str(tmp_path), 'validation')


def test_load_split_idx_missing_dir(tmp_path):
  missing = tmp_path / 'nowhere'
  cfg = _config(source='idx', name='fashion_mnist', dir=str(missing))
  with pytest.raises(ConfigError) as e:
    data.load_split(cfg, 'train')
  message = str(e.value)
  assert message.startswith(f'data.dir: {missing} does not exist')
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '\n' not in message


def test_load_split_idx_requires_fashion_mnist(tmp_path):
  with pytest.raises(ConfigError, match=r'^data\.name: '):
    data.load_split(_config(source='idx', name='mnist', dir=str(tmp_path)), 'train')


def test_load_split_idx_reads_written_files(tmp_path):
  images = np.arange(2 * 28 * 28, dtype=np.uint32).reshape(2, 28, 28)
  images = (images % 256).astype(np.uint8)
  _write_fashion_split(tmp_path, 'train', images, np.array([9, 0], np.uint8))
  ds = data.load_split(_config(source='idx', name='fashion_mnist', dir=str(tmp_path)), 'train')
  assert isinstance(ds, data.Dataset)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(ds.images[..., 0], images)
  np.testing.assert_array_equal(ds.labels, [9, 0])


def test_load_split_unknown_source():
  with pytest.raises(ConfigError, match=r"^data\.source: expected 'idx' or 'tfds', got"):
    data.load_split(_config(source='csv'), 'train')


@pytest.mark.skipif(
    not os.path.isdir(idx.FASHION_MNIST_DIR),
    reason=f'{idx.FASHION_MNIST_DIR} missing; apt-get install' ' dataset-fashion-mnist',
)
def test_real_fashion_mnist():
  cfg = _config(source='idx', name='fashion_mnist', dir=idx.FASHION_MNIST_DIR)
  train = data.load_split(cfg, 'train')
  test = data.load_split(cfg, 'test')
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  for ds in (train, test):
    assert ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32
    assert ds.labels.shape == ds.images.shape[:1]
    assert 0 <= ds.labels.min() and ds.labels.max() < 10
    assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)


# -------------------------------------------------------------------- TFDS


@pytest.mark.parametrize(
    'name, shape, num_classes',
    [
        ('cifar10', (32, 32, 3), 10),
        ('cifar100', (32, 32, 3), 100),
        ('fashion_mnist', (28, 28, 1), 10),
    ],
)
def test_load_split_tfds_mocked(name, shape, num_classes):
  with tfds.testing.mock_data(num_examples=12):
    ds = data.load_split(_config(name=name), 'train')
  assert ds.images.shape == (12,) + shape
  assert ds.images.dtype == np.uint8
  assert ds.labels.shape == (12,) and ds.labels.dtype == np.int32
  assert 0 <= ds.labels.min() and ds.labels.max() < num_classes
  assert ds.num_classes == num_classes


def test_load_split_tfds_is_deterministic():
  with tfds.testing.mock_data(num_examples=12):
    first = data.load_split(_config(), 'train')
  with tfds.testing.mock_data(num_examples=12):
    second = data.load_split(_config(), 'train')
  np.testing.assert_array_equal(first.images, second.images)
  np.testing.assert_array_equal(first.labels, second.labels)


class _FakeSource:
  """A random-access source whose batch reads work, like real array_record."""

  def __init__(self, images, labels, num_classes):
    self._images, self._labels = images, labels
    features = tfds.features.FeaturesDict(
        {
            'image': tfds.features.Image(shape=images.shape[1:]),
            'label': tfds.features.ClassLabel(num_classes=num_classes),
        }
    )
    self.dataset_info = types.SimpleNamespace(features=features)
    self.batch_reads = 0

  def __len__(self):
    return len(self._labels)

  def __getitem__(self, i):
    return {'image': self._images[i], 'label': np.int64(self._labels[i])}

  def __getitems__(self, indices):
    self.batch_reads += 1
    return [self[i] for i in indices]


def test_load_tfds_batched_reads_keep_index_order(monkeypatch):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(12, 4, 5, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, size=(12,))
  source = _FakeSource(images, labels, 3)
  monkeypatch.setattr(tfds, 'data_source', lambda *a, **k: source)
  monkeypatch.setattr(tfds_source, '_CHUNK', 5)
  out_images, out_labels, num_classes = tfds_source.load_tfds('fake', 'train')
  assert source.batch_reads == 3
  np.testing.assert_array_equal(out_images, images)
  np.testing.assert_array_equal(out_labels, labels)
  assert out_labels.dtype == np.int32 and num_classes == 3


class JpegImagesForTests(tfds.core.GeneratorBasedBuilder):
  """Six JPEGs of different sizes, prepared for real as array_record files: TFDS does that
  without TensorFlow when the images come already encoded (here by PIL)."""

  VERSION = tfds.core.Version('1.0.0')
  LABELS = (3, 1, 4, 1, 0, 2)

  def _info(self):
    features = {
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=5),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, label in enumerate(self.LABELS):
      jpeg = io.BytesIO()
      PIL.Image.fromarray(np.full((6 + i, 5, 3), 40 * i, np.uint8)).save(jpeg, 'JPEG')
      yield i, {'image': jpeg.getvalue(), 'label': label}


def test_tfds_records_labels_read_real_array_records_without_decoding_images(tmp_path, monkeypatch):
  skip_stats = tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP)
  builder = JpegImagesForTests(data_dir=str(tmp_path), file_format='array_record')
  builder.download_and_prepare(download_config=skip_stats)
  decode, decoded = tfds.features.Image.decode_example_np, []
  monkeypatch.setattr(
      tfds.features.Image, 'decode_example_np', lambda self, x: decoded.append(1) or decode(self, x)
  )
  monkeypatch.setattr(tfds_source, '_CHUNK', 4)  # two batch reads, kept in index order
  records = tfds_source.TfdsRecords(
      builder.name, 'train', data_dir=str(tmp_path), download=False, variable_size=True
  )
  labels = records.labels
  assert not decoded
  images, expected = records.read(np.arange(len(records)))
  assert not decoded  # variable-size images come as their files; the crops decode them
  assert all(isinstance(image, resized_crops.Encoded) for image in images)
  assert sorted(resized_crops.decode(image).shape[0] for image in images) == list(range(6, 12))
  tfds.data_source(builder.name, split='train', data_dir=str(tmp_path))[0]
  assert len(decoded) == 1  # the count does see decodes
  assert labels.dtype == np.int32 and sorted(labels) == sorted(builder.LABELS)
  np.testing.assert_array_equal(labels, expected)
  part = tfds_source.TfdsRecords(
      builder.name, 'train[2:5]', data_dir=str(tmp_path), download=False, variable_size=True
  )
  np.testing.assert_array_equal(part.labels, labels[2:5])


def test_load_tfds_unknown_dataset():
  with pytest.raises(ConfigError) as e:
    data.load_split(_config(name='no_such_dataset_xyz'), 'train')
  message = str(e.value)
  assert message.startswith("data.name: unknown TFDS dataset 'no_such_dataset_xyz'")
  assert '\n' not in message


def test_load_tfds_not_prepared(tmp_path):
  cfg = _config(name='cifar100', dir=str(tmp_path), download=False)
  with pytest.raises(ConfigError) as e:
    data.load_split(cfg, 'train')
  message = str(e.value)
  assert message.startswith("data.name: TFDS dataset 'cifar100'")
  assert str(tmp_path) in message
  assert 'tfds build cifar100 --file_format=array_record' in message
  assert 'data.download=True' in message
  assert '\n' not in message


def test_offline_download_fails_at_once_and_leaves_nothing(tmp_path, monkeypatch, capfd):
  """The real cifar100 builder and data dir, with its download host made unresolvable.

  `.invalid` never resolves (RFC 6761), so the test behaves alike with or without internet.
  """
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.setattr(tfds_source, '_download_hosts', lambda name, data_dir: ['cifar.invalid'])
  data_dir = tmp_path / 'tfds'
  started = time.time()
  with pytest.raises(ConfigError) as e:
    tfds_source.load_tfds('cifar100', 'train', data_dir=str(data_dir), download=True)
  assert time.time() - started < 30
  message = str(e.value)
  assert message.startswith(
      f"data.name: TFDS dataset 'cifar100' is not prepared in {data_dir} and cannot be "
      'downloaded (cannot reach cifar.invalid: '
  )
  assert 'tfds build cifar100 --file_format=array_record' in message and '\n' not in message
  assert list(tmp_path.iterdir()) == []  # no data dir, no ~/tensorflow_datasets
  out, err = capfd.readouterr()
  assert 'cifar100' not in out + err  # TFDS's own lines stay out of the terminal


def test_the_download_hosts_are_the_builders_registered_urls():
  assert tfds_source._download_hosts('cifar100', None) == ['www.cs.toronto.edu']


def test_a_failed_preparation_removes_what_it_created(tmp_path, monkeypatch):
  data_dir = tmp_path / 'tfds'
  (data_dir / 'mnist').mkdir(parents=True)  # someone else's dataset: kept
  monkeypatch.setattr(tfds_source, '_download_hosts', lambda name, data_dir: [])
  real = tfds.data_source

  def fail(*args, **kwargs):
    if not kwargs['download']:
      return real(*args, **kwargs)
    assert kwargs['download_and_prepare_kwargs'] == {'file_format': 'array_record'}
    (data_dir / 'cifar10' / '3.0.2.incompleteABC').mkdir(parents=True)
    (data_dir / 'downloads').mkdir()
    (data_dir / 'downloads' / 'cifar.tar.gz.tmp').write_text('partial')
    raise ConnectionError('Network is unreachable\nmore detail')

  monkeypatch.setattr(tfds, 'data_source', fail)
  with pytest.raises(ConfigError) as e:
    tfds_source.load_tfds('cifar10', 'train', data_dir=str(data_dir), download=True)
  message = str(e.value)
  assert 'could not be downloaded and prepared in' in message
  assert '(ConnectionError: Network is unreachable)' in message and '\n' not in message
  assert sorted(p.name for p in data_dir.iterdir()) == ['mnist']


def test_load_tfds_unknown_split(monkeypatch):
  def fail(*args, **kwargs):
    raise ValueError("Unknown split 'valid'. Should be one of ['train'].")

  monkeypatch.setattr(tfds, 'data_source', fail)
  with pytest.raises(ConfigError, match=r"has no split 'valid'"):
    tfds_source.load_tfds('cifar10', 'valid')


@pytest.mark.parametrize(
    'name, problem',
    [
        ('imdb_reviews', "no 'image' Image feature"),
        ('imagenette', 'variable shape'),
    ],
)
def test_load_tfds_rejects_non_image_classification(name, problem):
  with tfds.testing.mock_data(num_examples=3):
    with pytest.raises(ConfigError, match=rf'^data\.name: .*{problem}'):
      data.load_split(_config(name=name), 'train')


def test_import_does_not_import_tfds():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get('PYTHONPATH')) if p)
  subprocess.run(
      [
          sys.executable,
          '-c',
          'import sys, skd_jax.data; ' "assert 'tensorflow_datasets' not in sys.modules",
      ],
      check=True,
      cwd=_REPO_ROOT,
      env=env,
  )


@pytest.mark.parametrize('train_examples', [0, 20])
def test_both_pipelines_open_the_same_training_set_shape_and_normalisation(
    tmp_path, train_examples
):
  """``data.open`` is the one way a run opens its data: the device and host pipelines agree on
  what the model is built from (labels trained on, classes, input shape, normalisation)."""
  import runs  # pylint: disable=g-import-not-at-top
  from skd_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from skd_jax.data import sources  # pylint: disable=g-import-not-at-top
  from skd_jax.data import streaming  # pylint: disable=g-import-not-at-top

  config = runs.config('baseline')
  config.data.source, config.data.name = 'idx', 'fashion_mnist'
  config.data.dir = runs.fashion_mnist(tmp_path, 40, 12)
  config.data.train_examples = train_examples
  mesh = mesh_lib.make_mesh()
  opened = {}
  for pipeline in ('device', 'host'):
    config.data.pipeline = pipeline
    opened[pipeline] = data.open(config.data, mesh, 8)
  device, host = opened['device'], opened['host']
  assert isinstance(device.test, sources.DeviceEvalSet)
  assert isinstance(host.test, streaming.HostEvalSet)
  assert device.test.num_examples == host.test.num_examples == 12
  np.testing.assert_array_equal(device.labels, host.labels)
  assert len(device.labels) == (train_examples or 40)
  assert (device.num_classes, device.image_shape) == (host.num_classes, host.image_shape)
  assert device.image_shape == (28, 28, 1)
  np.testing.assert_allclose(device.mean + device.std, host.mean + host.std, rtol=1e-6)
  assert (device.selection is None) == (host.selection is None) == (not train_examples)
  assert isinstance(device.source(seed=0, batch_size=8), sources.OnDeviceSource)
  source = host.source(seed=0, batch_size=8)
  try:
    assert isinstance(source, streaming.HostSource)
    assert source.steps_per_epoch == device.source(seed=0, batch_size=8).steps_per_epoch
  finally:
    source.close()
