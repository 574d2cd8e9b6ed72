"""The one owner of every network's variables: the student, its EMA copy and a frozen teacher.

Layout:

* the train state's ``params`` and ``batch_stats`` are the student's: the backbone under
  ``'backbone'`` and each training-only head under its name (``skd_jax.models.WithHeads``). The
  heads are built here from the terms' :class:`skd_jax.terms.HeadRequest` s by the registry of
  head kinds (``skd_jax.models.build_head``);
* the train state's ``ema`` is ``{'params', 'batch_stats'}`` of the backbone alone, an exponential
  moving average of the student's (``{}`` when no term keeps one);
* a frozen teacher is another run's export (``skd_jax.load_model``), any architecture, with its own
  input normalisation. Its variables are an argument of the compiled step, never part of the train
  state: they are not trained, not weight-decayed and not copied into the student's checkpoints.

Every network normalises its own input (uint8, or float views in the uint8 pixel scale, e.g. a
mixup) with the statistics of the data it was trained on.
Evaluation and the export use the backbone alone (:meth:`Networks.inference`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skd_jax import export
from skd_jax import mesh as mesh_lib
from skd_jax import models
from skd_jax import terms
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError, ModelError


class Networks:
  """The student (with its heads), its EMA copy and a frozen teacher, and how each is applied.

  Args:
    spec: the student backbone's export spec (name, options, classes, input shape and
      normalisation).
    head_requests: term name -> the heads it asks for.
    ema_max_decay: keep an EMA copy, or None. Update ``t = 0, 1, ...`` (after the optimizer's
      step ``t``) is ``ema = d_t ema + (1 - d_t) student`` with
      ``d_t = min(1 - 1 / (t + 2), ema_max_decay)``: 1/2 at the first update, as the reference's
      ``min(1 - 1/(n + 1), lamda)`` with its counter ``n = t + 1`` already incremented.
    teacher: a loaded export (``skd_jax.export.Model``), or None.

  Raises:
    ConfigError: a head the backbone cannot carry, or a teacher for other inputs or classes.
  """

  def __init__(
      self,
      spec: models.ModelSpec,
      head_requests: dict[str, tuple[Any, ...]],
      *,
      ema_max_decay: float | None = None,
      teacher: export.Model | None = None,
  ):
    self.spec = spec
    self.backbone = spec.module()
    heads = tuple(
        models.build_head(self.backbone, r, term=term)
        for term, requests in head_requests.items()
        for r in requests
    )
    self.student = models.WithHeads(self.backbone, heads)
    self.ema_max_decay = ema_max_decay
    self.teacher = teacher
    if teacher is not None and (
        tuple(teacher.input_shape) != tuple(spec.input_shape)
        or teacher.num_classes != spec.num_classes
    ):
      raise ConfigError(
          f'teacher.workdir: the teacher takes {teacher.input_shape} images and has '
          f'{teacher.num_classes} classes; this run has {spec.input_shape} and {spec.num_classes}'
      )

  def init(self, key: jax.Array) -> dict[str, Any]:
    """The student's initial ``{'params', 'batch_stats'}``."""
    variables = self.student.init(
        key, jnp.zeros((1, *self.spec.input_shape), jnp.float32), train=False
    )
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

  def apply_student(self, params, batch_stats, images):
    """Train-mode student on uint8 (or float, ``[0, 255]``) images: logits, outputs, new stats."""
    (logits, outputs), updates = self.student.apply(
        {'params': params, 'batch_stats': batch_stats},
        self.spec.normalize(images),
        train=True,
        mutable=['batch_stats'],
    )
    return logits, outputs, updates['batch_stats']

  @staticmethod
  def inference(params, batch_stats) -> dict[str, Any]:
    """The backbone's variables (what evaluation, the EMA copy and the export hold)."""
    return {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}

  def apply_inference(self, variables, images):
    """Evaluation-mode backbone (the student's or the EMA copy's variables): logits, outputs."""
    return self.backbone.apply(variables, self.spec.normalize(images), train=False)

  def apply_teacher(self, variables, images):
    """The frozen teacher in evaluation mode on uint8 images: logits, outputs."""
    x = self.teacher.spec.normalize(images)
    logits, outputs = self.teacher.module.apply(variables, x, train=False)
    return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(outputs)

  def classify(self, params, features: jax.Array) -> jax.Array:
    """The student's own final Dense layer on ``[B, D]`` pooled features: float32 logits."""
    dense = nn.Dense(self.spec.num_classes, dtype=features.dtype)
    return dense.apply({'params': params['backbone']['head']}, features).astype(jnp.float32)

  def init_ema(self, params, batch_stats) -> dict[str, Any]:
    return self.inference(params, batch_stats) if self.ema_max_decay is not None else {}

  def update_ema(self, ema, params, batch_stats, update: jax.Array) -> dict[str, Any]:
    """``ema`` after update number ``update`` (0-based) of the student's variables."""
    if self.ema_max_decay is None:
      return ema
    t = update.astype(jnp.float32)
    decay = jnp.minimum(1.0 - 1.0 / (t + 2.0), self.ema_max_decay)
    new = self.inference(params, batch_stats)
    return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)

  def teacher_variables(self, mesh):
    """The teacher's variables replicated on ``mesh`` (None without a teacher)."""
    if self.teacher is None:
      return None
    replicated = mesh_lib.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)),
        self.teacher.variables,
    )

  def forward(self, params, batch_stats, views, batch, forwards, *, ema=None, teacher=None):
    """The student's main pass over ``views`` and the extra passes ``forwards`` over ``batch``.

    Args:
      params, batch_stats: the student's.
      views: ``[B * V, H, W, C]`` views of the main examples: uint8, or float32 in the uint8
        pixel scale when a term's view maker returns float images.
      batch: the step's groups (``skd_jax.data.sources.Batch``).
      forwards: the terms' :class:`skd_jax.terms.Forward` s.
      ema, teacher: the EMA copy's and the teacher's variables, for passes of those networks.

    Returns:
      The main pass's logits and outputs, the passes by name (``skd_jax.terms.Pass``), and the
      new BatchNorm statistics: the main call's, then each separate student pass's in order.
    """
    n = views.shape[0]
    joint = [f for f in forwards if f.network == 'student' and f.batchnorm == 'joint']
    images = jnp.concatenate([views] + [batch[f.group].images for f in joint]) if joint else views
    logits, outputs, batch_stats = self.apply_student(params, batch_stats, images)

    def make_pass(forward, examples, logits, outputs):
      found = terms.Pass(logits.astype(jnp.float32), examples.labels, examples.valid, outputs)
      return found if forward.grad else jax.lax.stop_gradient(found)

    passes, start = {}, n
    for forward in joint:
      examples = batch[forward.group]
      part = slice(start, start + examples.labels.shape[0])
      start = part.stop
      parts = {k: v[part] for k, v in outputs.items()}
      passes[forward.name] = make_pass(forward, examples, logits[part], parts)
    logits, outputs = logits[:n], {k: v[:n] for k, v in outputs.items()}
    for forward in forwards:
      examples = batch[forward.group]
      if forward.network == 'student' and forward.batchnorm == 'separate':
        # After the main pass, as the references' second call: running statistics see both.
        found = self.apply_student(params, batch_stats, examples.images)
        batch_stats = found[2]
      elif forward.network == 'ema':
        found = self.apply_inference(ema, examples.images)
      elif forward.network == 'teacher':
        found = self.apply_teacher(teacher, examples.images)
      else:
        continue
      passes[forward.name] = make_pass(forward, examples, found[0], found[1])
    return logits, outputs, passes, batch_stats

  def export(self, path: str, params, batch_stats) -> None:
    """Writes the backbone as ``skd_jax.load_model`` reads it."""
    variables = self.inference(params, batch_stats)
    export.save_model(path, **variables, spec=self.spec)


def load_teacher(workdir: str, *, wanted: bool) -> export.Model | None:
  """The teacher exported in ``workdir`` (``teacher.workdir``), or None when it is ''.

  Raises:
    ConfigError: a term needs a teacher and ``workdir`` is '', a teacher is given that no term
      uses (``wanted`` is False), ``workdir`` holds no exported model or one that cannot be used
      (``skd_jax.errors.ModelError``: an invalid spec, unreadable or damaged files), or is in a
      bucket that cannot be reached.
  """
  if not workdir:
    if wanted:
      raise ConfigError(
          "teacher.workdir: a loss term needs a teacher; expected an earlier run's workdir"
      )
    return None
  if not wanted:
    raise ConfigError(
        'teacher.workdir: set, but no loss term uses a teacher (e.g. loss.teacher_kd)'
    )
  workdir_lib.check_remote(workdir, 'teacher.workdir')
  try:
    return export.load_model(workdir)
  except (FileNotFoundError, ModelError) as e:
    raise ConfigError(f'teacher.workdir: {e}') from None
