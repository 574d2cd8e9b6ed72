"""The term protocol: what a loss term is given, declares and returns (see ``skd_jax.terms``)."""

import abc
import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

NETWORKS = ('student', 'ema', 'teacher')
GROUPS = ('main', 'partner', 'previous', 'again')  # skd_jax.data.sources.GROUPS


@dataclasses.dataclass(frozen=True)
class Forward:
  """A forward pass a term asks for; its result is ``inputs.passes[name]``, a :class:`Pass`.

  Attributes:
    name: key in ``inputs.passes``; terms asking for the same name must ask for the same pass.
    group: the examples: ``'main'``, ``'partner'``, ``'previous'`` or ``'again'`` (the main
      examples under an independent second draw of the training augmentation).
    network: ``'student'``, ``'ema'`` (the student's EMA copy) or ``'teacher'`` (frozen).
    grad: student only: whether gradients flow through the pass.
    batchnorm: student only: ``'separate'`` (its own call and batch statistics) or ``'joint'``
      (part of the main pass's call: batch statistics over both).
  """

  name: str
  group: str = 'main'
  network: str = 'student'
  grad: bool = False
  batchnorm: str = 'separate'

  def __post_init__(self):
    if self.group not in GROUPS or self.network not in NETWORKS:
      raise ValueError(f'forward {self.name}: unknown group {self.group!r} or network')
    if self.batchnorm not in ('separate', 'joint'):
      raise ValueError(f'forward {self.name}: batchnorm must be separate or joint')
    if self.network != 'student' and (self.grad or self.batchnorm != 'separate'):
      raise ValueError(f'forward {self.name}: only student passes take grad or joint batchnorm')


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pass:
  """The result of a :class:`Forward` over a group of ``B`` examples.

  Attributes:
    logits: ``[B, C]`` float32.
    labels: ``[B]`` the group's labels.
    valid: ``[B]`` False on padding slots (and, for ``'previous'``, at a run's first step).
    outputs: the network's named intermediates, ``[B, ...]`` each.
  """

  logits: jax.Array
  labels: jax.Array
  valid: jax.Array
  outputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class HeadRequest:
  """A training-only head a term asks ``skd_jax.networks`` to build.

  The head's outputs appear in ``inputs.outputs``: its float32 logits under ``name`` and every
  other output it returns under ``f'{name}/{key}'`` (every kind returns at least ``'features'``,
  a pooled vector; FRSKD's self-teacher also its refined maps ``'stage<i>'``). The backbone's own
  feature maps are always there too, ``outputs['stage<i>']``, without asking.

  Attributes:
    name: key of the head's logits in ``inputs.outputs`` and of its variables.
    stage: the backbone stage (1-based) whose output a one-stage head reads; 0 when ``stages`` is
      given.
    kind: a registered head kind (``skd_jax.models.head_kinds()``): ``'drg'`` (LightSKD's
      attention head), ``'later_stages'`` (the backbone's later stages again, HSAKD/LSSKD),
      ``'linear'`` (global average pooling and a Dense layer, USKD's weak classifier),
      ``'frskd'`` (FRSKD's self-teacher over several stages), ``'mixskd'`` (MixSKD's branches and
      self-teacher over stages 1..N), or one a plug-in module registered
      with ``skd_jax.models.register_head``.
    num_outputs: number of logits.
    stages: the stages (1-based, in the order the head takes them) a head reads; defaults to
      ``(stage,)``.
    options: ``(key, value)`` pairs for the kind's builder (e.g. FRSKD's ``('width', 2)``).
  """

  name: str
  stage: int
  kind: str
  num_outputs: int
  stages: tuple[int, ...] = ()
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if not self.stages:
      object.__setattr__(self, 'stages', (self.stage,))
    elif self.stage and tuple(self.stages) != (self.stage,):
      raise ValueError(f'head {self.name}: give stage or stages, not both')
    object.__setattr__(self, 'stages', tuple(self.stages))
    object.__setattr__(self, 'options', tuple(self.options))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TermInputs:
  """What a term sees of one training step (a pytree, so it passes through ``jax.jit``).

  Attributes:
    logits: ``[B, C]`` final-head logits of the original view.
    labels: ``[B]`` integer labels.
    outputs: the model's named intermediates (stage features, auxiliary-head logits) of the
      original view, ``[B, ...]`` each.
    epoch: 0-based epoch (an int32 scalar in the trainer).
    views: ``'logits'`` and every output for every view of the batch, ``[B, V, ...]`` each (view 0
      is the original). Defaults to the single view ``logits`` / ``outputs``. Inside
      :class:`Combined` a term sees only view 0 and its own views (``1 + num_views - 1``).
    valid: ``[B]`` False on padding slots; defaults to all True.
    passes: the extra forward passes the terms asked for (:class:`Forward`), by name.
    key: a PRNG key of this term and step (None outside the trainer unless given).
    classify: the student's final Dense layer, ``[B, D] features -> [B, C]`` float32 logits
      (None outside the trainer unless given).
  """

  logits: jax.Array
  labels: jax.Array
  outputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  epoch: Any = 0
  views: Mapping[str, jax.Array] | None = None
  valid: jax.Array | None = None
  passes: Mapping[str, Pass] = dataclasses.field(default_factory=dict)
  key: jax.Array | None = None
  classify: Callable[[jax.Array], jax.Array] | None = dataclasses.field(
      default=None, metadata=dict(static=True)
  )

  def __post_init__(self):
    if self.views is None:
      single = {'logits': self.logits, **self.outputs}
      object.__setattr__(self, 'views', {k: v[:, None] for k, v in single.items()})
    if self.valid is None:
      object.__setattr__(self, 'valid', jnp.ones(self.labels.shape, jnp.bool_))

  @property
  def one_hot(self) -> jax.Array:
    """``[B, C]`` float32 one-hot labels."""
    return jax.nn.one_hot(self.labels, self.logits.shape[-1], dtype=jnp.float32)

  @classmethod
  def from_forward(
      cls,
      logits: jax.Array,
      outputs: Mapping[str, jax.Array],
      labels: jax.Array,
      epoch: Any,
      num_views: int,
      **fields,
  ) -> 'TermInputs':
    """Inputs from a forward pass over ``B * num_views`` images laid out example-major.

    ``fields`` are the other attributes (``valid``, ``passes``, ``key``, ``classify``).
    """
    batch = labels.shape[0]
    views = {
        k: v.reshape(batch, num_views, *v.shape[1:])
        for k, v in {'logits': logits.astype(jnp.float32), **outputs}.items()
    }
    return cls(
        logits=views['logits'][:, 0],
        labels=labels,
        outputs={k: views[k][:, 0] for k in outputs},
        epoch=epoch,
        views=views,
        **fields,
    )


class TermOutput(NamedTuple):
  """A term's result: per-example ``loss`` ``[B]``, next ``rows`` and ``carry``, and metrics.

  A metric is a scalar, or a ``[B]`` per-example value that the trainer averages over the real
  examples of the batch.
  """

  loss: jax.Array
  rows: Any = None
  carry: Any = None
  metrics: Mapping[str, jax.Array] = {}


@dataclasses.dataclass(frozen=True)
class Context:
  """Facts about the run that terms may need when they are built."""

  num_classes: int
  num_epochs: int
  batch_size: int
  image_shape: tuple[int, ...] | None = None  # (H, W, channels) of one example
  num_stages: int | None = None  # the backbone's numbered stages (outputs 'stage1'...)


class LossTerm(abc.ABC):
  """Base class of loss terms. Subclasses are frozen dataclasses with a ``weight`` field.

  Their other fields are the term's settings (declared with ``terms.setting``) and facts of the
  run, named like :class:`Context` fields. Override ``__call__`` always; ``check`` for settings
  that depend on the run; ``init_rows`` / ``init_carry`` (and ``carry_sharding``) for stateful
  terms; ``heads`` for terms that need auxiliary heads; ``num_views`` and ``make_views`` for terms
  that need extra views of each example; ``forwards`` for extra forward passes; ``ema_max_decay``
  for an EMA copy of the student; ``init_params``, ``optimizer`` and ``objective`` for
  parameters the term trains itself (a discriminator). A term with parameters receives them in
  ``__call__`` as the keyword argument ``params``.
  """

  name: str
  weight: float
  num_views: int = 1
  forwards: tuple[Forward, ...] = ()
  carry_sharding: str = 'replicated'  # or 'batch': every carry leaf is [B, ...]
  ema_max_decay: float | None = None

  def check(self, context: Context) -> 'LossTerm | None':
    """Checks what depends on the run, when ``terms.build`` makes the term from a config.

    Each setting was already checked alone against its declaration. Raise
    ``skd_jax.errors.ConfigError`` with one line ``'loss.NAME.KEY: ...'`` (``self.name`` is the
    config's ``NAME``). May return a copy with settings derived from ``context`` (e.g. USKD's
    default stage); None keeps the term as it is.
    """
    del context
    return None

  def init_rows(self, labels: jax.Array) -> Any:
    """Initial per-example state from the ``[N]`` labels: a pytree of ``[N, ...]`` arrays, or None."""
    del labels
    return None

  def init_carry(self) -> Any:
    """Initial step-to-step state (arrays of static shape), or None."""
    return None

  def heads(self) -> tuple[HeadRequest, ...]:
    """Training-only heads this term needs (built by ``skd_jax.networks``)."""
    return ()

  def init_params(self, key: jax.Array) -> Any:
    """Initial parameters this term trains itself (a pytree of float arrays), or None.

    ``key`` is the term's own PRNG key, derived from the run's seed and the term's name.
    """
    del key
    return None

  def optimizer(self) -> optax.GradientTransformation | None:
    """The optax transformation that updates the term's parameters (with ``init_params``)."""
    return None

  def objective(self, params: Any, inputs: TermInputs) -> jax.Array:
    """The ``[B]`` per-example objective the term's parameters minimise (with ``init_params``).

    ``inputs`` are the step's :class:`TermInputs` under ``jax.lax.stop_gradient`` (the student's
    outputs before its update, without ``classify``); the trainer averages the objective over the
    batch's real examples and differentiates it with respect to ``params`` alone. A term with
    parameters must override it (``Combined.init_params`` refuses one that does not); this
    default, a term without parameters, has no objective: zeros.
    """
    del params
    return jnp.zeros(inputs.labels.shape, jnp.float32)

  def make_views(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``[B, num_views, H, W, C]`` views of the ``[B, H, W, C]`` augmented uint8 main images.

    View 0 must be the images themselves (:class:`Combined` keeps the original in its place).
    Views may be uint8 or float in the uint8 pixel scale (``[0, 255]``, e.g. a mixup of two
    images); the network normalises either the same way. ``key`` is this term's PRNG key of the
    step, the same key its ``__call__`` receives as ``inputs.key`` (None outside the trainer
    unless given), so the loss can recompute the draws (mixing coefficients, pairings).
    """
    del key
    return images[:, None]

  @abc.abstractmethod
  def __call__(self, inputs: TermInputs, rows: Any = None, carry: Any = None) -> TermOutput:
    """Per-example losses for the batch, with the batch's new rows and the next carry."""
