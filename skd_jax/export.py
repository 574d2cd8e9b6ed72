"""The trained model as users load it: one directory with everything inference needs.

A run ends by writing ``workdir/model/``, one orbax checkpoint (written to a temporary directory
and renamed, so it is there whole or not at all) with two items:

* ``variables``: ``{'params', 'batch_stats'}`` of the backbone alone: no training-only heads, no
  optimizer or loss state;
* ``spec``: JSON with what the variables alone do not say (``skd_jax.models.ModelSpec``, also
  importable from here as ``skd_jax.export.ModelSpec``): the model's name (and, for a model from
  outside skd_jax, the import path of its module) and its options as given to
  ``skd_jax.models.get_model``, the number of classes, the input shape and the input
  normalisation measured on the training split, the fingerprint of the variables
  (``skd_jax.checkpoints.fingerprint``: its version and one checksum per array) and the SHA-256 of
  the spec's own fields (``spec_sha256``), so that a changed normalisation is caught too.

:func:`load_model` reads it back as a :class:`Model`, which is called on uint8 images::

  model = skd_jax.load_model('workdirs/pskd_quick')  # the workdir, or its model/ folder
  logits = model(images)  # uint8 [N, H, W, C] -> float32 [N, num_classes]

:func:`load_model` runs no code from the directory (a plug-in model's module is installed code,
below) and trusts nothing in it: the spec is checked
field by field, the model it names is compared with the stored arrays' metadata (paths, shapes,
dtypes) before any array is read or allocated, and the variables read are compared with their
fingerprint. A model exported before fingerprints existed loads with a warning that it cannot be
verified.

A model from outside skd_jax (``config.model.module``, ``skd_jax.plugins``) is rebuilt by importing
the module its spec names and calling its ``make``: installed code (``pip install``, or on
``PYTHONPATH``), as when it trained, never a file of the exported directory. Load such a model
only where that module is installed, and only from a directory you trust to name it.
"""

import functools
import hashlib
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from skd_jax import checkpoints
from skd_jax import workdir
from skd_jax.errors import ConfigError, ModelError
from skd_jax.models.spec import is_positive_int
from skd_jax.models.spec import ModelSpec  # defined beside the models; skd_jax.export.ModelSpec too

log = logging.getLogger(__name__)


def save_model(path: str | os.PathLike, *, params, batch_stats, spec: ModelSpec) -> None:
  """Writes the model to the directory ``path``, replacing any model there.

  Every process of a run calls it (orbax writes the arrays from all of them).

  Raises:
    FloatingPointError: a parameter or BatchNorm statistic is not finite; nothing is written.
  """
  variables = {'params': params, 'batch_stats': batch_stats}
  record, non_finite = checkpoints.fingerprint(variables)
  if non_finite:
    raise FloatingPointError(f'model: non-finite values in {non_finite[0]}; nothing was exported')
  fields = spec.to_json()
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
    checkpointer.save(
        workdir.path(path),
        args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            spec=ocp.args.JsonSave(
                {**fields, 'fingerprint': record, 'spec_sha256': _digest(fields)}
            ),
        ),
        force=True,
    )


def _digest(fields: dict[str, Any]) -> str:
  """The SHA-256 of a spec's fields (:meth:`ModelSpec.to_json`) as canonical JSON."""
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


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


class _Unheld(Exception):
  """A layer that the stored arrays do not hold, met while tracing the model."""


def _leaf_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def _check_sizes(spec: ModelSpec, stored: dict[str, Any], spec_path, variables_path) -> None:
  """Refuses a spec whose sizes exceed what the stored arrays could hold.

  A model has at least one array per layer and a dimension per width, so no count or width of
  the spec exceeds both the number of stored arrays and their largest dimension. This bounds the
  model traced next, whatever the spec says.
  """
  largest = max((d for leaf in stored.values() for d in leaf.shape), default=0)
  sizes = {'num_classes': spec.num_classes, 'input_shape': spec.input_shape[2]}
  # Counts and widths: a plug-in model's options may also be other numbers or strings.
  is_size = lambda v: is_positive_int(v) or (
      isinstance(v, tuple) and v and all(map(is_positive_int, v))
  )
  sizes.update({f'options.{k}': v for k, v in spec.options.items() if is_size(v)})
  for field, value in sizes.items():
    if max(value if isinstance(value, tuple) else (value,)) > max(largest, len(stored)):
      raise ModelError(
          f'{spec_path}: {field}: {value!r:.80} is more than {variables_path} holds '
          f'({len(stored)} arrays, none with a dimension over {largest})'
      )


def _abstract_variables(spec: ModelSpec, module, stored: dict[str, Any], spec_path):
  """The shapes and dtypes of the variables ``spec`` implies; the trace stops at the first layer
  that no stored array belongs to, so its cost is bounded by the stored model's."""
  held = set()
  for name in stored:
    layers = name.split('/')[1:-1]  # without the collection and the array's own name
    held.update(tuple(layers[:i]) for i in range(len(layers) + 1))

  def guard(call, args, kwargs, context):
    if context.module.path not in held:
      raise _Unheld('/'.join(context.module.path))
    return call(*args, **kwargs)

  with nn.intercept_methods(guard):
    try:
      return jax.eval_shape(
          functools.partial(module.init, train=False),
          jax.random.key(0),
          jax.ShapeDtypeStruct((1, *spec.input_shape), jnp.float32),
      )
    except _Unheld as e:
      raise ModelError(f'{spec_path}: implies a layer {e} that the stored arrays lack') from None


def _compare(expected: dict[str, Any], stored: dict[str, Any], variables_path) -> None:
  """Refuses stored arrays that are not the ones the spec implies, naming the first."""
  for name in sorted(expected.keys() | stored.keys()):
    if name not in stored:
      raise ModelError(f'{variables_path}: holds no array {name}; the spec implies one')
    if name not in expected:
      raise ModelError(f'{variables_path}: holds {name}, which the spec does not imply')
    want, have = expected[name], stored[name]
    if tuple(want.shape) != tuple(have.shape) or jnp.dtype(want.dtype) != jnp.dtype(have.dtype):
      raise ModelError(
          f'{variables_path}: {name} is {jnp.dtype(have.dtype).name}{list(have.shape)}; the '
          f'spec implies {jnp.dtype(want.dtype).name}{list(want.shape)}'
      )


def load_model(path: str | os.PathLike) -> Model:
  """Loads the model a run exported; ``path`` is the run's workdir or its ``model/`` folder, on a
  local disk or in a bucket (``gs://``).

  The variables are placed on the default device, whatever the devices the run trained on.
  Nothing is read or allocated beyond the stored arrays' metadata until the spec is known to
  agree with it (see the module docstring).

  Raises:
    FileNotFoundError: ``path`` holds no exported model.
    ModelError: the model cannot be used (a ``ValueError``): its spec is invalid or does not
      match the stored arrays, its files cannot be read, or the arrays do not match their
      fingerprint. One line naming the file.
  """
  path = workdir.path(path)
  if not (path / 'spec').is_dir() and (path / 'model').is_dir():
    path = path / 'model'
  if not (path / 'spec').is_dir():
    raise FileNotFoundError(
        f"{path}: no exported model; expected a run's workdir or its model/ folder"
    )
  spec_path, variables_path = path / 'spec', path / 'variables'
  handlers = dict(spec=ocp.JsonCheckpointHandler(), variables=ocp.StandardCheckpointHandler())
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers)) as checkpointer:

    def read(item_path, step):
      try:
        return step()
      except Exception as e:  # orbax and tensorstore fail with many types  # pylint: disable=broad-except
        raise ModelError(f'{item_path}: cannot read ({checkpoints.read_error(e)})') from None

    saved = read(
        spec_path,
        lambda: checkpointer.restore(
            path, args=ocp.args.Composite(spec=ocp.args.JsonRestore())
        ).spec,
    )
    spec = ModelSpec.from_json(saved, spec_path)
    metadata = read(variables_path, lambda: checkpointer.metadata(path).item_metadata.variables)
    stored = {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(metadata)}
    try:
      module = spec.module()
    except ConfigError as e:
      raise ModelError(f'{spec_path}: {e}') from None
    _check_sizes(spec, stored, spec_path, variables_path)
    shapes = _abstract_variables(spec, module, stored, spec_path)
    _compare(
        {_leaf_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(shapes)},
        stored,
        variables_path,
    )
    if 'spec_sha256' in saved:
      fields = {k: v for k, v in saved.items() if k not in ('fingerprint', 'spec_sha256')}
      if _digest(fields) != saved['spec_sha256']:
        raise ModelError(
            f'{spec_path}: does not match its fingerprint (spec_sha256); the exported model is '
            'damaged'
        )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), shapes)
    variables = read(
        variables_path,
        lambda: checkpointer.restore(
            path, args=ocp.args.Composite(variables=ocp.args.StandardRestore(dict(target)))
        ).variables,
    )
  if 'fingerprint' in saved:
    damaged = checkpoints.verify(variables, saved['fingerprint'])
    if damaged:
      raise ModelError(f'{variables_path}: {damaged}; the exported model is damaged')
  else:
    log.warning(
        '%s: exported without a fingerprint (before skd_jax checked models); its variables '
        'cannot be verified.',
        path,
    )
  return Model(spec, module, variables)
