"""The exported model's spec: what inference needs besides the variables.

:class:`ModelSpec` names a model of :mod:`skd_jax.models` (or a plug-in's module) with its
options, classes, input shape and input normalisation. The trainer builds one for the student
(``skd_jax.train``), ``skd_jax.networks`` builds the model from it, and ``skd_jax.export`` stores
it as JSON beside the variables and reads it back, checked field by field
(:meth:`ModelSpec.from_json`), before anything else of an exported directory is trusted.
"""

import dataclasses
import math
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from skd_jax import models  # the package this module is part of: used at call time only
from skd_jax import plugins
from skd_jax.data import pipeline
from skd_jax.errors import ModelError

FORMAT = 'skd_jax.model/1'
_MAX_SIDE = 1 << 16  # the largest image height or width a spec may give


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
  """An int (not a bool) of at least 1."""
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_float_dtype(value) -> bool:
  try:
    return isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except TypeError:
    return False


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What inference needs besides the variables.

  Attributes:
    name: the model's name in ``skd_jax.models.MODELS`` (with ``import_path``, only a label).
    options: keyword arguments of ``models.get_model`` besides ``num_classes``, ``dtype`` (a
      string, e.g. ``'float32'``) included.
    num_classes: number of logits.
    input_shape: ``(H, W, C)`` of one image.
    mean: per-channel mean of the training images scaled to [0, 1].
    std: per-channel standard deviation, likewise; the model sees ``(x / 255 - mean) / std``.
    import_path: '' (a model of ``MODELS``) or the import path of the module whose ``make``
      builds the model (``config.model.module``); the JSON holds it only when it is not ''.
  """

  name: str
  options: dict[str, Any]
  num_classes: int
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  import_path: str = ''

  def to_json(self) -> dict[str, Any]:
    fields = dataclasses.asdict(self)
    if not self.import_path:  # a built-in model's spec is as before plug-ins existed
      del fields['import_path']
    return {'format': FORMAT, **fields}

  @classmethod
  def from_json(cls, spec: Any, path: str | os.PathLike) -> 'ModelSpec':
    """The spec in ``spec``, the JSON read from ``path``, checked field by field.

    The model's name and options are checked when the model is built (:meth:`module`).

    Raises:
      ModelError: ``spec`` is not an object, has another format, lacks a field or holds a value
        of the wrong type or out of range; the message names ``path`` and the field.
    """

    def fail(field, expected, value):
      raise ModelError(f'{path}: {field}: expected {expected}, got {value!r:.80}')

    if not isinstance(spec, dict):
      raise ModelError(f'{path}: expected a JSON object, got {type(spec).__name__}')
    if spec.get('format') != FORMAT:
      raise ModelError(f'{path}: format {spec.get("format")!r:.80}; expected {FORMAT!r}')
    names = [f.name for f in dataclasses.fields(cls) if f.name != 'import_path']
    missing = [name for name in names if name not in spec]
    if missing:
      raise ModelError(f'{path}: no field {missing[0]!r}; expected {", ".join(names)}')
    as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v
    name, options, num_classes, input_shape, mean, std = (as_tuples(spec[n]) for n in names)
    if not isinstance(name, str):
      fail('name', 'the name of a model', name)
    if not isinstance(options, dict):
      fail('options', 'an object of model options', options)
    options = {k: as_tuples(v) for k, v in options.items()}
    if not _is_float_dtype(options.get('dtype', 'float32')):
      fail('options.dtype', "a floating-point dtype such as 'float32'", options['dtype'])
    if not is_positive_int(num_classes):
      fail('num_classes', 'a positive integer', num_classes)
    if not (
        isinstance(input_shape, tuple)
        and len(input_shape) == 3
        and all(map(is_positive_int, input_shape))
        and max(input_shape[:2]) <= _MAX_SIDE
    ):
      fail('input_shape', f'[H, W, C], positive integers, H and W at most {_MAX_SIDE}', input_shape)
    for field, values in (('mean', mean), ('std', std)):
      if not (
          isinstance(values, tuple)
          and len(values) == input_shape[2]
          and all(_is_number(v) and math.isfinite(v) for v in values)
      ):
        fail(field, f'one finite number per channel ({input_shape[2]})', values)
    if min(std) <= 0:
      fail('std', 'positive numbers', std)
    import_path = spec.get('import_path', '')
    if not (import_path == '' or plugins.is_path(import_path)):
      fail('import_path', "a module's import path", import_path)
    return cls(
        name,
        options,
        num_classes,
        input_shape,
        tuple(map(float, mean)),
        tuple(map(float, std)),
        import_path,
    )

  def normalize(self, images):
    """uint8 images ``[N, H, W, C]`` as the model sees them, in its computation dtype."""
    dtype = jnp.dtype(self.options.get('dtype', 'float32'))
    return pipeline.normalize(images, np.float32(self.mean), np.float32(self.std), dtype)

  def module(self):
    options = dict(self.options)
    dtype = jnp.dtype(options.pop('dtype', 'float32'))
    return models.get_model(
        self.name, num_classes=self.num_classes, dtype=dtype, module=self.import_path, **options
    )
