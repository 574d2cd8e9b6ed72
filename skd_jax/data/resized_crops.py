"""ImageNet-style crops on the host, for images of any size: encoded files or numpy in, PIL
resampling, uint8 out.

* Training: :func:`random_resized_crops`, torchvision's ``RandomResizedCrop(size)`` with its
  defaults (area fraction in ``SCALE``, aspect ratio log-uniform in ``RATIO``, ``ATTEMPTS`` tries,
  then a centre crop of the whole image clipped to ``RATIO``), bilinear resampling, then a
  horizontal flip with probability 1/2.
* Evaluation: :func:`resize_centre_crop`, torchvision's ``Resize(resize)`` (shorter side to
  ``resize``, bilinear) followed by ``CenterCrop(size)``.

PIL's bilinear filter widens its support when it shrinks (antialiasing), as torchvision's PIL
path does. A crop's randomness comes from one numpy generator per batch: every draw is made for
all ``size`` slots of the global batch and the ``share`` of this process is sliced out, so an
example's crop depends on ``(generator seed, slot, image)`` only, not on the process count.

Images come decoded (numpy) or still encoded (:class:`Encoded`, what
``skd_jax.data.tfds_source.TfdsRecords`` reads for ImageNet). An encoded image is decoded only as
far as its crop needs: the box is drawn from the size in the file's header, a JPEG is decoded
downscaled in the DCT domain (by 1/2, 1/4 or 1/8) when the box, so shrunk, is still at least the
output size, and only the box is resampled, in one resize. The boxes are the same as a full
decode's; the pixels stay within a few levels of a full decode's crop of the same box
(tests/test_imagenet.py states the bounds).

Two codecs do this, chosen by :func:`codec`:

* ``'simplejpeg'``, when the ``jpeg`` extra is installed (``pip install 'skd_jax[jpeg]'``):
  libjpeg-turbo through ``simplejpeg`` decodes straight to numpy (the same pixels as Pillow's
  decode, with the accurate IDCT and smooth chroma upsampling also when downscaled), and
  ``cykooz-resizer`` (Rust's ``fast_image_resize``, SIMD) resamples the box with PIL's bilinear
  filter (the same weights; PIL's own rounding differs by at most one level);
* ``'pillow'``: PIL's ``Image.draft`` (its downscaled decodes use the fast IDCT and no smooth
  upsampling) and PIL's ``resize``; always available, and what files other than baseline or
  progressive YCbCr / grayscale JPEGs (PNG, CMYK) and files libjpeg-turbo rejects take anyway.

``SKD_JAX_JPEG=pillow`` in the environment picks Pillow although the extra is installed (read at
every batch, so worker processes started with it follow it too).
"""

import functools
import io
import math
import os
import threading
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image

try:  # the `jpeg` extra
  import cykooz_resizer
  import simplejpeg
except ImportError:
  cykooz_resizer = simplejpeg = None

SCALE = (0.08, 1.0)  # range of the crop's area as a fraction of the image's
RATIO = (3 / 4, 4 / 3)  # range of the crop's width / height
ATTEMPTS = 10  # boxes drawn before falling back to the centre crop
CODEC_ENV = 'SKD_JAX_JPEG'  # 'pillow': decode and resample encoded images with Pillow only


class Encoded(NamedTuple):
  """An image as its file's bytes (JPEG, PNG, ...), decoded to ``channels`` channels when used."""

  data: bytes
  channels: int


def codec() -> str:
  """Which codec decodes and resamples :class:`Encoded` JPEGs now: ``'simplejpeg'`` when the
  ``jpeg`` extra is installed and ``SKD_JAX_JPEG`` is not ``pillow``, else ``'pillow'``."""
  if simplejpeg is None or os.environ.get(CODEC_ENV, '').lower() == 'pillow':
    return 'pillow'
  return 'simplejpeg'


def _open(image: Encoded) -> Image.Image:
  """The image, its header read and nothing decoded yet."""
  return Image.open(io.BytesIO(image.data))


def _mode(channels: int) -> str:
  return 'L' if channels == 1 else 'RGB'


def decode(image: Encoded) -> np.ndarray:
  """The whole image, uint8 ``[H, W, channels]`` (grayscale files repeated to RGB, as TFDS does)."""
  with _open(image) as pil:
    return _array(pil.convert(_mode(image.channels)), image.channels)


def dimensions(image: np.ndarray | Encoded) -> tuple[int, int]:
  """``(height, width)`` of a decoded image, or of an encoded one from its header alone."""
  if isinstance(image, Encoded):
    header = _jpeg_header(image) if codec() == 'simplejpeg' else None
    if header is not None:
      return header
    with _open(image) as pil:
      return pil.height, pil.width
  return image.shape[0], image.shape[1]


def _dct_scale(reduction: float) -> int:
  """The largest of 8, 4 and 2 that is at most ``reduction``, else 1: by how much a JPEG may be
  decoded smaller (libjpeg scales each side by ``1 / scale``, rounding up)."""
  return next((s for s in (8, 4, 2) if s <= reduction), 1)


def _draft(pil: Image.Image, channels: int, reduction: float) -> float:
  """Asks a JPEG to decode in ``channels``, downscaled by :func:`_dct_scale` of ``reduction`` (not
  for other formats).

  Returns:
    By how much each side of the decoded image is smaller: 1, 2, 4 or 8.
  """
  width, height = pil.size
  scale = _dct_scale(reduction)
  # PIL takes the largest of 8, 4, 2, 1 that keeps the decoded image at least the size asked.
  drafted = pil.draft(_mode(channels), (width // scale, height // scale) if scale > 1 else None)
  return 1.0 if drafted is None else width / drafted[1][2]


def _resized_box(
    image: Encoded, box: tuple[float, float, float, float], size: int, reduction: float
) -> np.ndarray:
  """The ``(left, upper, right, lower)`` box of the encoded ``image`` (full-size coordinates)
  resized to ``[size, size, channels]``, from a decode downscaled by at most ``reduction``."""
  if codec() == 'simplejpeg':
    resized = _turbo_resized_box(image, box, size, reduction)
    if resized is not None:
      return resized
  with _open(image) as pil:
    scale = _draft(pil, image.channels, reduction)
    box = tuple(b / scale for b in box)
    resized = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return _array(resized.convert(_mode(image.channels)), image.channels)


def _jpeg_header(image: Encoded) -> tuple[int, int] | None:
  """``(height, width)`` of a JPEG that libjpeg-turbo decodes as Pillow does (YCbCr or grayscale),
  else None (other formats, CMYK)."""
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(image.data)
  except ValueError:
    return None
  return (height, width) if colorspace in ('YCbCr', 'Gray') else None


def _turbo_resized_box(
    image: Encoded, box: tuple[float, float, float, float], size: int, reduction: float
) -> np.ndarray | None:
  """:func:`_resized_box` through libjpeg-turbo (``simplejpeg``) and ``fast_image_resize``, or
  None for the files it leaves to Pillow."""
  header = _jpeg_header(image)
  if header is None:
    return None
  height, width = header
  scale = _dct_scale(reduction)
  try:
    # min_factor rules out libjpeg-turbo's scales between 1/8 and 1 other than 1/scale (3/4, ...):
    # their IDCTs are not SIMD and cost more than the whole decode.
    pixels = simplejpeg.decode_jpeg(
        image.data,
        'GRAY' if image.channels == 1 else 'RGB',
        min_height=-(-height // scale),
        min_width=-(-width // scale),
        min_factor=scale,
    )
  except ValueError:  # data libjpeg-turbo refuses (strictly) and Pillow may still read
    return None
  # Decoded pixel i covers pixels [i * scale, (i + 1) * scale) of the whole image.
  return _resample(pixels.reshape(*pixels.shape[:2], -1), [b / scale for b in box], size)


_RESIZERS = threading.local()  # a Resizer is not to be shared between threads


def _resample(pixels: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
  """The ``(left, upper, right, lower)`` box of uint8 ``pixels`` [H, W, C] (C 1 or 3) resampled to
  ``[size, size, C]`` with PIL's bilinear filter (widened when shrinking), by
  ``fast_image_resize``."""
  left, upper, right, lower = box
  # Only the pixels the filter reaches are handed over (copied twice): the box and, around it,
  # the filter's half-width (the box's side / size, at least 1) and a pixel of rounding.
  x_margin, y_margin = (max((b - a) / size, 1.0) + 1.0 for a, b in ((left, right), (upper, lower)))
  x0, y0 = max(math.floor(left - x_margin), 0), max(math.floor(upper - y_margin), 0)
  x1 = min(math.ceil(right + x_margin), pixels.shape[1])
  y1 = min(math.ceil(lower + y_margin), pixels.shape[0])
  height, width, channels = y1 - y0, x1 - x0, pixels.shape[2]
  pixel = cykooz_resizer.PixelType.U8 if channels == 1 else cykooz_resizer.PixelType.U8x3
  source = cykooz_resizer.ImageData(width, height, pixel, pixels[y0:y1, x0:x1].tobytes())
  out = cykooz_resizer.ImageData(size, size, pixel)
  left, upper = left - x0, upper - y0
  # The box ends inside the pixels; the shift by (x0, y0) must not round it past their end.
  crop = cykooz_resizer.CropBox(
      left, upper, min(right - x0, width) - left, min(lower - y0, height) - upper
  )
  options = cykooz_resizer.ResizeOptions(
      cykooz_resizer.ResizeAlg.convolution(cykooz_resizer.FilterType.bilinear),
      use_alpha=False,
      crop_box=crop,
  )
  if not hasattr(_RESIZERS, 'resizer'):
    _RESIZERS.resizer = cykooz_resizer.Resizer()
  _RESIZERS.resizer.resize(source, out, options)
  return np.frombuffer(out.get_buffer(), np.uint8).reshape(size, size, channels)


def random_resized_box(
    height: int, width: int, area: np.ndarray, log_ratio: np.ndarray, position: np.ndarray
) -> tuple[int, int, int, int]:
  """torchvision's ``RandomResizedCrop.get_params`` with the random numbers given.

  Args:
    height, width: the image's size.
    area: ``[ATTEMPTS]`` area fractions, uniform in ``SCALE``.
    log_ratio: ``[ATTEMPTS]`` log aspect ratios, uniform in ``log(RATIO)``.
    position: ``[ATTEMPTS, 2]`` uniforms in [0, 1) that place the box (top, left).

  Returns:
    ``(top, left, crop_height, crop_width)``: the first drawn box that fits in the image, else
    the largest centred box whose aspect ratio is clipped to ``RATIO``.
  """
  for fraction, log_r, (u, v) in zip(area, log_ratio, position):
    target, ratio = height * width * fraction, math.exp(log_r)
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      # torchvision draws randint(0, H - h + 1); u * (H - h + 1) floored is the same law.
      top = min(int(u * (height - h + 1)), height - h)
      left = min(int(v * (width - w + 1)), width - w)
      return top, left, h, w
  if width / height < RATIO[0]:
    w, h = width, int(round(width / RATIO[0]))
  elif width / height > RATIO[1]:
    h, w = height, int(round(height * RATIO[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(image, np.uint8)
  return out[..., None] if channels == 1 else out


def resized_crop(
    image: np.ndarray | Encoded, box: tuple[int, int, int, int], size: int
) -> np.ndarray:
  """The ``(top, left, height, width)`` box of ``image`` [H, W, C] resized to [size, size, C]."""
  top, left, h, w = box
  if isinstance(image, Encoded):
    return _resized_box(image, (left, top, left + w, top + h), size, min(h, w) / size)
  resized = _pil(image).resize(
      (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
  )
  return _array(resized, image.shape[-1])


def random_resized_crops(
    rng: np.random.Generator,
    images: Sequence[np.ndarray | Encoded],
    share: slice,
    size: int,
    image_size: int,
    flip: bool,
) -> np.ndarray:
  """Random-resized crops (and flips) of ``images``, the ``share`` of a batch of ``size`` slots.

  Args:
    rng: the batch's generator; every draw is made for all ``size`` slots.
    images: the share's uint8 images [H_i, W_i, C], any sizes, or :class:`Encoded` ones.
    share: this process's slots of the batch.
    size: the global batch size.
    image_size: side of the square output.
    flip: whether to flip horizontally with probability 1/2.

  Returns:
    uint8 ``[len(images), image_size, image_size, C]``.
  """
  area = rng.uniform(SCALE[0], SCALE[1], (size, ATTEMPTS))[share]
  log_ratio = rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (size, ATTEMPTS))[share]
  position = rng.random((size, ATTEMPTS, 2))[share]
  flips = (rng.random(size) < 0.5)[share] & flip
  out = []
  for i, image in enumerate(images):
    box = random_resized_box(*dimensions(image), area[i], log_ratio[i], position[i])
    crop = resized_crop(image, box, image_size)
    out.append(_mirrored(crop) if flips[i] else crop)
  return np.stack(out)


@functools.lru_cache(maxsize=8)
def _mirror_columns(width: int, channels: int) -> np.ndarray:
  """Indices of a row of ``width`` pixels of ``channels`` bytes each, the pixels mirrored."""
  return ((width - 1 - np.arange(width))[:, None] * channels + np.arange(channels)).ravel()


def _mirrored(image: np.ndarray) -> np.ndarray:
  """``image[:, ::-1]`` [H, W, C], contiguous: one gather of whole rows, about 3x faster than
  numpy's copy of the reversed view (whose inner loop is a pixel's C bytes)."""
  height, width, channels = image.shape
  rows = np.ascontiguousarray(image).reshape(height, width * channels)
  return np.take(rows, _mirror_columns(width, channels), axis=1).reshape(image.shape)


def resize_centre_crop(image: np.ndarray | Encoded, resize: int, size: int) -> np.ndarray:
  """``image`` [H, W, C] with its shorter side resized to ``resize``, then the centre
  ``size`` x ``size`` crop (torchvision's ``Resize(resize)`` + ``CenterCrop(size)``).

  An :class:`Encoded` image is resampled at the crop's pixels only (the same sampling positions
  and filter as the whole resize), from a JPEG decode downscaled while its shorter side stays at
  least ``resize``.
  """
  height, width = dimensions(image)
  if height <= width:
    new_h, new_w = resize, int(resize * width / height)
  else:
    new_h, new_w = int(resize * height / width), resize
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  if isinstance(image, Encoded):
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return _resized_box(image, box, size, min(sx, sy))
  resized = _array(_pil(image).resize((new_w, new_h), Image.Resampling.BILINEAR), image.shape[-1])
  return resized[top : top + size, left : left + size]
