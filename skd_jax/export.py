"""The trained model as users load it: one directory with everything inference needs.

A run ends by writing ``workdir/model/``, one orbax checkpoint (written to a temporary directory
and renamed, so it is there whole or not at all) with two items:

* ``variables``: ``{'params', 'batch_stats'}`` of the backbone alone: no training-only heads, no
  optimizer or loss state;
* ``spec``: JSON with what the variables alone do not say (:class:`ModelSpec`): the model's name
  and its options as given to ``skd_jax.models.get_model``, the number of classes, the input
  shape and the input normalisation measured on the training split.

:func:`load_model` reads it back as a :class:`Model`, which is called on uint8 images::

  model = skd_jax.load_model('workdirs/pskd_quick')  # the workdir, or its model/ folder
  logits = model(images)  # uint8 [N, H, W, C] -> float32 [N, num_classes]
"""

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skd_jax import checkpoints
from skd_jax import models
from skd_jax import workdir
from skd_jax.data import pipeline

FORMAT = 'skd_jax.model/1'


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What inference needs besides the variables.

  Attributes:
    name: the model's name in ``skd_jax.models.MODELS``.
    options: keyword arguments of ``models.get_model`` besides ``num_classes``, ``dtype`` (a
      string, e.g. ``'float32'``) included.
    num_classes: number of logits.
    input_shape: ``(H, W, C)`` of one image.
    mean: per-channel mean of the training images scaled to [0, 1].
    std: per-channel standard deviation, likewise; the model sees ``(x / 255 - mean) / std``.
  """

  name: str
  options: dict[str, Any]
  num_classes: int
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def to_json(self) -> dict[str, Any]:
    return {'format': FORMAT, **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, spec: dict[str, Any], path: str) -> 'ModelSpec':
    if spec.get('format') != FORMAT:
      raise ValueError(f'{path}: format {spec.get("format")!r}; expected {FORMAT!r}')
    as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v
    fields = {f.name: as_tuples(spec[f.name]) for f in dataclasses.fields(cls)}
    fields['options'] = {k: as_tuples(v) for k, v in spec['options'].items()}
    return cls(**fields)

  def normalize(self, images):
    """uint8 images ``[N, H, W, C]`` as the model sees them, in its computation dtype."""
    dtype = jnp.dtype(self.options.get('dtype', 'float32'))
    return pipeline.normalize(images, np.float32(self.mean), np.float32(self.std), dtype)

  def module(self):
    options = dict(self.options)
    dtype = jnp.dtype(options.pop('dtype', 'float32'))
    return models.get_model(self.name, num_classes=self.num_classes, dtype=dtype, **options)


def save_model(path: str | os.PathLike, *, params, batch_stats, spec: ModelSpec) -> None:
  """Writes the model to the directory ``path``, replacing any model there.

  Every process of a run calls it (orbax writes the arrays from all of them).

  Raises:
    FloatingPointError: a parameter or BatchNorm statistic is not finite; nothing is written.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  _, non_finite = checkpoints.fingerprint(variables)
  if non_finite:
    raise FloatingPointError(f'model: non-finite values in {non_finite[0]}; nothing was exported')
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
        workdir.path(path),
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables), spec=ocp.args.JsonSave(spec.to_json())
        ),
        force=True,
    )


class Model:
  """A loaded model: call it on uint8 images ``[N, H, W, C]`` to get float32 logits.

  Attributes:
    spec: the :class:`ModelSpec` it was saved with.
    module: the Flax module (the backbone).
    variables: its ``{'params', 'batch_stats'}``, on the default device.
  """

  def __init__(self, spec: ModelSpec, module, variables):
    self.spec, self.module, self.variables = spec, module, variables

    @jax.jit
    def forward(variables, images):
      return module.apply(variables, spec.normalize(images), train=False)[0]

    self._forward = forward

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return self.spec.input_shape

  def __call__(self, images) -> jax.Array:
    """Float32 logits ``[N, num_classes]`` of uint8 images ``[N, H, W, C]`` (numpy or JAX)."""
    if images.dtype != np.uint8:
      raise ValueError(f'images: expected uint8 pixels in [0, 255], got {images.dtype}')
    if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
      raise ValueError(
          f'images: expected shape [N, {", ".join(map(str, self.input_shape))}], '
          f'got {list(images.shape)}'
      )
    return self._forward(self.variables, images)


def load_model(path: str | os.PathLike) -> Model:
  """Loads the model a run exported; ``path`` is the run's workdir or its ``model/`` folder, on a
  local disk or in a bucket (``gs://``).

  The variables are placed on the default device, whatever the devices the run trained on.

  Raises:
    FileNotFoundError: ``path`` holds no exported model.
    ValueError: the model was exported in an unknown format.
  """
  path = workdir.path(path)
  if not (path / 'spec').is_dir() and (path / 'model').is_dir():
    path = path / 'model'
  if not (path / 'spec').is_dir():
    raise FileNotFoundError(
        f"{path}: no exported model; expected a run's workdir or its model/ folder"
    )
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    spec = checkpointer.restore(path, args=ocp.args.Composite(spec=ocp.args.JsonRestore())).spec
    spec = ModelSpec.from_json(spec, path)
    module = spec.module()
    shapes = jax.eval_shape(
        functools.partial(module.init, train=False),
        jax.random.key(0),
        jnp.zeros((1, *spec.input_shape), jnp.float32),
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    variables = checkpointer.restore(
        path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(dict(target)))
    ).variables
  return Model(spec, module, variables)
