"""Reader for the IDX file format and the Fashion-MNIST files stored in it.

IDX (the format of the original MNIST distribution) is a 4-byte magic number,
two zero bytes, a dtype code byte and a dimension-count byte, followed by one
big-endian uint32 per dimension and then the array data in C order, with
multi-byte values big-endian. Files may be gzip-compressed.

`load_fashion_mnist` returns whole splits with examples in file order, so the
stable index of an example in its split is its row in the returned arrays: row
i is example i of the file, on every run and in every process.
"""

import gzip
import math
import os
import zlib

import numpy as np

from skd_jax.errors import ConfigError, InputError

# Where the Debian package `dataset-fashion-mnist` installs the .gz idx files.
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'

FASHION_MNIST_NUM_CLASSES = 10

# IDX dtype code -> big-endian numpy dtype of the stored values.
_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}

_GZIP_MAGIC = b'\x1f\x8b'

_SPLIT_PREFIXES = {'train': 'train', 'test': 't10k'}


def _read_bytes(path: str) -> bytes:
  """Returns the contents of `path`, gunzipped if it is a gzip file."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except FileNotFoundError:
    raise ConfigError(f'{path}: no such file; expected an IDX file') from None
  except OSError as e:
    raise ConfigError(
        f'{path}: cannot be read ({e.strerror or e}); expected a readable IDX' ' file'
    ) from None
  # Sniff the content rather than trust the name: an IDX file always starts
  # with two zero bytes, so it can never be mistaken for gzip's 0x1f 0x8b.
  if raw[:2] != _GZIP_MAGIC:
    return raw
  try:
    return gzip.decompress(raw)
  except (EOFError, OSError, zlib.error) as e:
    raise ConfigError(
        f'{path}: corrupt or truncated gzip data ({type(e).__name__}); expected'
        ' a gzip-compressed IDX file, download it again'
    ) from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into a numpy array.

  Args:
    path: the file; gzip compression is detected from its content, so both
      `x-idx3-ubyte` and `x-idx3-ubyte.gz` work whatever their names.

  Returns:
    A freshly allocated, writable array with the file's shape and the native
    byte order version of its dtype (uint8, int8, int16, int32, float32 or
    float64).

  Raises:
    ConfigError: the file is missing, unreadable, corrupt or truncated.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ConfigError(
        f'{path}: not an IDX file (bad magic number); expected two zero bytes,'
        ' a dtype code and a dimension count'
    )
  code, ndim = data[2], data[3]
  if code not in _IDX_DTYPES:
    raise ConfigError(
        f'{path}: unknown IDX dtype code 0x{code:02X}; expected one of '
        + ', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)
    )
  if ndim == 0:
    raise ConfigError(f'{path}: IDX file with 0 dimensions; expected at least 1')
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise ConfigError(
        f'{path}: truncated IDX header ({len(data)} bytes, {header_size}'
        ' needed); download the file again'
    )
  shape = tuple(int(d) for d in np.frombuffer(data, dtype='>u4', count=ndim, offset=4))
  dtype = _IDX_DTYPES[code]
  expected = math.prod(shape) * dtype.itemsize
  actual = len(data) - header_size
  if actual != expected:
    what = 'truncated' if actual < expected else 'has trailing bytes'
    raise ConfigError(
        f'{path}: IDX data {what} ({actual} bytes after the header, {expected}'
        f' expected for shape {shape}); download the file again'
    )
  values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
  # astype always copies here, giving a writable array in native byte order
  # instead of a read-only view of the file buffer.
  return values.astype(dtype.newbyteorder('='))


class IdxRows:
  """Rows of an uncompressed IDX file, read on demand: ``rows[index]`` reads only those rows.

  Each row is one ``os.pread`` (positionless, so threads may share the file); nothing of the file
  stays in memory. A memory map would read the same bytes, but a file truncated during the run
  then kills the whole process with SIGBUS; here a short read raises :class:`InputError`.

  Attributes:
    dtype, shape: of the stored array (``shape[0]`` rows).

  Raises:
    ConfigError: the file is gzip-compressed (no random access), or its header or size is bad.
  """

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, 'rb')  # pylint: disable=consider-using-with  # open as long as self
    header = self._file.read(4)
    if header[:2] == _GZIP_MAGIC:
      raise ConfigError(f'{path}: gzip-compressed; expected an uncompressed IDX file')
    if len(header) < 4 or header[:2] != b'\0\0' or header[2] not in _IDX_DTYPES or not header[3]:
      raise ConfigError(f'{path}: not an IDX file (bad magic number)')
    ndim = header[3]
    self.shape = tuple(int(d) for d in np.frombuffer(self._file.read(4 * ndim), dtype='>u4'))
    self.dtype, self._offset = _IDX_DTYPES[header[2]], 4 + 4 * ndim
    self._row_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
    size = os.fstat(self._file.fileno()).st_size
    if len(self.shape) != ndim or size != self._offset + self.shape[0] * self._row_bytes:
      raise ConfigError(f'{path}: IDX size does not match its header; download the file again')

  def __getitem__(self, index: np.ndarray) -> np.ndarray:
    rows = []
    for i in np.asarray(index).tolist():
      row = os.pread(self._file.fileno(), self._row_bytes, self._offset + i * self._row_bytes)
      if len(row) < self._row_bytes:
        size = os.fstat(self._file.fileno()).st_size
        raise InputError(
            f'{self.path}: row {i} lies past the end of the file ({size} bytes, '
            f'{self._offset + self.shape[0] * self._row_bytes} when the run opened it): the file '
            'was truncated during the run; restore it and rerun to continue'
        )
      rows.append(row)
    values = np.frombuffer(b''.join(rows), self.dtype).reshape(len(rows), *self.shape[1:])
    return values.astype(self.dtype.newbyteorder('='))


def _find_file(directory: str, base: str) -> str:
  """Returns the path of `base` or `base.gz` in `directory`, preferring .gz."""
  for name in (base + '.gz', base):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise ConfigError(
      f'{os.path.join(directory, base)}[.gz]: missing; expected the'
      f' Fashion-MNIST file {base}.gz or {base} in {directory}'
  )


def _split_files(directory: str, split: str) -> tuple[str, str]:
  """The images and labels files of a Fashion-MNIST split in ``directory``."""
  if not os.path.isdir(directory):
    raise ConfigError(
        f'data.dir: {directory} does not exist; install the Debian package'
        ' dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or'
        ' point --config.data.dir at a folder with the Fashion-MNIST idx files'
    )
  if split not in _SPLIT_PREFIXES:
    raise ConfigError(
        f"split: expected 'train' or 'test' for Fashion-MNIST idx files, got" f' {split!r}'
    )
  prefix = _SPLIT_PREFIXES[split]
  return (
      _find_file(directory, f'{prefix}-images-idx3-ubyte'),
      _find_file(directory, f'{prefix}-labels-idx1-ubyte'),
  )


def load_fashion_mnist(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads a whole Fashion-MNIST split from its IDX files.

  Row i of both returned arrays is example i of the files, so it is the
  example's stable index in the split across runs and processes.

  Args:
    directory: folder holding `{train,t10k}-{images-idx3,labels-idx1}-ubyte`,
      each either gzip-compressed (`.gz`) or not, e.g. `FASHION_MNIST_DIR`.
    split: 'train' (60000 examples) or 'test' (10000 examples).

  Returns:
    images: uint8 [N, 28, 28, 1].
    labels: int32 [N], in [0, 10).

  Raises:
    ConfigError: the directory or a file is missing, a file is corrupt, or the
      files do not hold matching 28x28 uint8 images and labels in [0, 10).
  """
  images_path, labels_path = _split_files(directory, split)
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
    raise ConfigError(
        f'{images_path}: holds {images.dtype} {list(images.shape)}; expected'
        ' uint8 images of shape [N, 28, 28]'
    )
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise ConfigError(
        f'{labels_path}: holds {labels.dtype} {list(labels.shape)}; expected'
        ' uint8 labels of shape [N]'
    )
  if images.shape[0] != labels.shape[0]:
    raise ConfigError(
        f'{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images'
        f' in {images_path}; expected one label per image'
    )
  if images.shape[0] == 0:
    raise ConfigError(f'{images_path}: holds 0 images; expected at least one example')
  if labels.max() >= FASHION_MNIST_NUM_CLASSES:
    raise ConfigError(
        f'{labels_path}: label {int(labels.max())} out of range; expected'
        f' labels in [0, {FASHION_MNIST_NUM_CLASSES})'
    )
  # Keep an explicit channel axis so grayscale and RGB data share NHWC code.
  return images[..., None], labels.astype(np.int32)


class FashionMnistRecords:
  """Random access to a Fashion-MNIST split for the host-streaming source.

  An uncompressed images file is read row by row (:class:`IdxRows`), so a process reads only the
  rows it asks for and holds none of the file; a gzip-compressed one (as the Debian package
  ships) has no random access and is decompressed whole, once per process, on first read. Labels
  (60 KB) are read at once. Picklable: host workers reopen the files themselves.
  """

  num_classes = FASHION_MNIST_NUM_CLASSES
  image_shape = (28, 28, 1)

  def __init__(self, directory: str, split: str):
    self._images_path, labels_path = _split_files(directory, split)
    self.labels = read_idx(labels_path).astype(np.int32)
    if self.labels.ndim != 1 or not len(self.labels) or self.labels.max() >= self.num_classes:
      raise ConfigError(f'{labels_path}: expected at least one label in [0, {self.num_classes})')
    self._images = None

  def __len__(self) -> int:
    return len(self.labels)

  def __getstate__(self):
    return {**self.__dict__, '_images': None}

  def read(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[n, 28, 28, 1]`` and int32 labels ``[n]`` of the examples ``index``."""
    if self._images is None:
      with open(self._images_path, 'rb') as f:
        compressed = f.read(2) == _GZIP_MAGIC
      images = read_idx(self._images_path) if compressed else IdxRows(self._images_path)
      if images.dtype != np.uint8 or images.shape != (len(self.labels), 28, 28):
        raise ConfigError(
            f'{self._images_path}: holds {images.dtype} {list(images.shape)}; expected uint8 '
            f'images of shape [{len(self.labels)}, 28, 28]'
        )
      self._images = images
    index = np.asarray(index)
    return np.asarray(self._images[index])[..., None], self.labels[index]
