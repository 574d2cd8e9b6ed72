"""Composable loss terms: the unit a method is built from.

A method is a weighted sum of terms, named in the config::

  config.loss.pskd = dict(weight=1.0, alpha_T=0.8)

The trainer imports ``skd_jax.terms.<name>`` and calls its ``make(settings, context)``, so a new
method is a new module here plus a config file; the trainer does not change.

A term is pure: it maps :class:`TermInputs` (what the step's forward passes produced) plus its
own state to per-example losses and its next state. It declares what it needs beyond the final
logits of the main examples, and the trainer provides it without knowing the method:

* named intermediates of the backbone (``inputs.outputs['stage2']``, ``'features'``), always there;
* training-only auxiliary heads (:meth:`LossTerm.heads`): :class:`HeadRequest` s that
  ``skd_jax.networks`` builds (terms construct no Flax modules); their logits appear in
  ``inputs.outputs`` under the head's name, and the evaluated and exported model never contains
  them;
* extra views of the main examples (:attr:`LossTerm.num_views`, :meth:`LossTerm.make_views`), e.g.
  LSSKD's four rotations: the student's main pass then sees ``B * V`` images, ``inputs.logits`` /
  ``inputs.outputs`` hold view 0 and ``inputs.views`` every view. At most one term adds views;
* extra groups of examples and forward passes over them (:attr:`LossTerm.forwards`, each a
  :class:`Forward`): the ``'partner'`` group (a same-class example for every main example) or the
  ``'previous'`` group (the previous step's main examples), each independently augmented, seen by
  the student (with or without gradient), by the EMA copy of the student, or by a frozen teacher.
  The result is ``inputs.passes[forward.name]``. Views apply to the main group only: an extra
  group is one augmented view per example. Two terms may ask for the same pass (same name, same
  settings); the trainer runs it once;
* randomness: ``inputs.key``, a PRNG key of its own per step, derived from ``(seed, step, term
  name)``, so a resumed run draws the same numbers;
* the student's own classifier (``inputs.classify(features)``: the final Dense layer applied to
  pooled features, with gradient), e.g. for SD-Dropout's dropped copies;
* state, created by the term, stored in the train state and in every checkpoint:

  * ``rows``: one row per training example (e.g. PS-KD's history of past predictions,
    ``[N, C]``), or a pytree of such ``[N, ...]`` tables (PS-KD's top-k history). The trainer keeps the table sharded along examples with the data, hands the term
    the rows of the batch's examples, and writes back the rows the term returns (skipping padding
    and duplicate indices), moving only ``O(batch x classes)`` per step.
  * ``carry``: a small pytree carried from one step to the next, replicated on every device
    (:attr:`LossTerm.carry_sharding` ``'replicated'``, e.g. DSR's previous sorted logits), or
    sharded along ``data`` with the batch (``'batch'``: every leaf ``[B, ...]``, e.g. DLB's previous
    logits, which then never cross devices).
  * an exponential moving average of the student's backbone variables
    (:attr:`LossTerm.ema_max_decay`): after every optimizer step ``ema = d ema + (1 - d) new``
    with ``d = min(1 - 1 / (t + 2), ema_max_decay)`` at update ``t = 0, 1, ...``; forward passes
    with ``network='ema'`` use it, and evaluation reports its metrics beside the student's.

BatchNorm: the main pass runs the student in train mode over the main examples' ``B * V`` views;
batch statistics are over that global batch. A student :class:`Forward` over another group is
either a separate call (``batchnorm='separate'``: its own batch statistics, as the reference
CS-KD and DLB code, and it updates the running statistics after the main pass) or part of the
main call (``batchnorm='joint'``: the statistics cover both). EMA and teacher passes run in
evaluation mode (running statistics) and update nothing.

One step::

      source.batch(step) ---> {'main', 'partner'?, 'previous'?}: index, valid, labels, uint8 images
            |                      |                       |
    views (main only)      student passes           EMA / teacher passes (eval mode, no gradient)
            |              (grad or not; BN joint       |
            v               or separate)                |
      student main pass -------->  TermInputs  <--------+   + rows[index], carry, key(seed, step)
      (train mode, grad)              |
                                      v
                Combined: sum_t weight_t * L_t,i  ->  mean over valid i  ->  grad
                                      |
            optimizer update -> new rows scattered, carry, EMA update, measurements

:class:`Combined` sums weighted terms (``optax.chain``'s role for losses): it is what the trainer
uses, and other JAX code can call it, or any single term, on plain arrays.

Not yet provided: parameters a term trains with an optimizer of its own (AI-KD's discriminator).
The intended shape: the term declares an ``optax`` transformation and initial parameters, the
train state keeps them and their optimizer state under the term's name beside ``rows`` and
``carry``, and the step differentiates the term's own objective with respect to them after the
student's update, so nothing in the student's gradient or weight decay touches them.
"""

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping, NamedTuple, TYPE_CHECKING
import zlib

import jax
import jax.numpy as jnp

from skd_jax.errors import ConfigError

if TYPE_CHECKING:
  # Only a type here: the core install (losses and terms) does not need ml_collections.
  import ml_collections

NETWORKS = ('student', 'ema', 'teacher')
GROUPS = ('main', 'partner', 'previous')  # skd_jax.data.sources.GROUPS


@dataclasses.dataclass(frozen=True)
class Forward:
  """A forward pass a term asks for; its result is ``inputs.passes[name]``, a :class:`Pass`.

  Attributes:
    name: key in ``inputs.passes``; terms asking for the same name must ask for the same pass.
    group: the examples: ``'main'``, ``'partner'`` or ``'previous'``.
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

  Attributes:
    name: key of the head's logits in ``inputs.outputs`` and of its variables.
    stage: the backbone stage (1-based) whose output the head reads.
    kind: ``'drg'`` (LightSKD's attention head) or ``'later_stages'`` (the backbone's later
      stages again, HSAKD/LSSKD).
    num_outputs: number of logits.
  """

  name: str
  stage: int
  kind: str
  num_outputs: int


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
      is the original). Defaults to the single view ``logits`` / ``outputs``.
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


# Term fields a config does not set: the name, and the facts of the run.
_NOT_SETTINGS = {'name'} | {f.name for f in dataclasses.fields(Context)}


class LossTerm(abc.ABC):
  """Base class of loss terms. Subclasses are frozen dataclasses with a ``weight`` field.

  Override ``__call__`` always; ``init_rows`` / ``init_carry`` (and ``carry_sharding``) for
  stateful terms; ``heads`` for terms that need auxiliary heads; ``num_views`` and ``make_views``
  for terms that need extra views of each example; ``forwards`` for extra forward passes;
  ``ema_max_decay`` for an EMA copy of the student.
  """

  name: str
  weight: float
  num_views: int = 1
  forwards: tuple[Forward, ...] = ()
  carry_sharding: str = 'replicated'  # or 'batch': every carry leaf is [B, ...]
  ema_max_decay: float | None = None

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

  def make_views(self, images: jax.Array) -> jax.Array:
    """``[B, num_views, ...]`` views of ``[B, ...]`` images; view 0 must be the images."""
    return images[:, None]

  @abc.abstractmethod
  def __call__(self, inputs: TermInputs, rows: Any = None, carry: Any = None) -> TermOutput:
    """Per-example losses for the batch, with the batch's new rows and the next carry."""


class CombinedOutput(NamedTuple):
  """:class:`Combined`'s result.

  Attributes:
    loss: ``[B]`` weighted sum of the terms' per-example losses.
    losses: term name -> its unweighted ``[B]`` loss.
    rows: term name -> the batch's new rows (stateful terms only).
    carry: term name -> next carry.
    metrics: the terms' metrics.
  """

  loss: jax.Array
  losses: dict[str, jax.Array]
  rows: dict[str, Any]
  carry: dict[str, Any]
  metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Combined:
  """A weighted sum of loss terms: ``L_i = sum_t weight_t * L_t,i``.

  Rows and carries are dicts keyed by term name. At most one term may add views of the batch;
  every term then sees the same ``B * V`` forward pass. Forward passes of the same name are run
  once; EMA copies asked for by several terms must have the same decay.
  """

  terms: tuple[LossTerm, ...]

  def __post_init__(self):
    names = [t.name for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'terms: names must be unique, got {names}')
    viewers = [t.name for t in self.terms if t.num_views > 1]
    if len(viewers) > 1:
      raise ValueError(
          f'terms: {" and ".join(viewers)} both add views of the batch; at most one term may'
      )
    names = [f.name for f in self.forwards]
    for name in names:
      if names.count(name) > 1:
        raise ValueError(f'terms: two different forward passes are named {name!r}')
    decays = {t.ema_max_decay for t in self.terms} - {None}
    if len(decays) > 1:
      raise ValueError(f'terms: EMA copies with different decays {sorted(decays)}')
    if any(f.network == 'ema' for f in self.forwards) and not decays:
      raise ValueError('terms: a forward pass of the EMA copy, but no term keeps one')

  @property
  def forwards(self) -> tuple[Forward, ...]:
    """Every extra forward pass, once, in the order the terms ask for them."""
    return tuple(dict.fromkeys(f for t in self.terms for f in t.forwards))

  @property
  def groups(self) -> tuple[str, ...]:
    """The example groups besides ``'main'`` that the forward passes read."""
    return tuple(g for g in GROUPS[1:] if any(f.group == g for f in self.forwards))

  @property
  def ema_max_decay(self) -> float | None:
    return next((t.ema_max_decay for t in self.terms if t.ema_max_decay is not None), None)

  def carry_sharding(self) -> dict[str, str]:
    """Term name -> ``'replicated'`` or ``'batch'``."""
    return {t.name: t.carry_sharding for t in self.terms}

  @property
  def num_views(self) -> int:
    return max([t.num_views for t in self.terms], default=1)

  def views(self, images: jax.Array) -> jax.Array:
    """``[B * V, ...]`` images, example-major (the ``V`` views of example ``i`` are adjacent)."""
    viewer = next((t for t in self.terms if t.num_views > 1), None)
    if viewer is None:
      return images
    views = viewer.make_views(images)
    return views.reshape(-1, *views.shape[2:])

  def heads(self) -> dict[str, tuple[HeadRequest, ...]]:
    """Term name -> its head requests; head names must not collide."""
    heads = {t.name: t.heads() for t in self.terms}
    names = [h.name for hs in heads.values() for h in hs]
    if len(set(names)) != len(names):
      raise ConfigError(f'loss: two terms attach heads with the same name: {names}')
    return heads

  def init_rows(self, labels: jax.Array) -> dict[str, Any]:
    """Initial per-example tables of the stateful terms, by term name."""
    rows = {t.name: t.init_rows(labels) for t in self.terms}
    return {k: v for k, v in rows.items() if v is not None}

  def init_carry(self) -> dict[str, Any]:
    """Initial carry of every term (None for terms without one), by term name."""
    return {t.name: t.init_carry() for t in self.terms}

  def __call__(
      self,
      inputs: TermInputs,
      rows: Mapping[str, Any] | None = None,
      carry: Mapping[str, Any] | None = None,
  ) -> CombinedOutput:
    """Calls every term with its own rows, carry and PRNG key; sums weighted losses."""
    rows, carry = rows or {}, carry or {}
    total, per_term, new_rows, new_carry, metrics = 0.0, {}, {}, {}, {}
    for term in self.terms:
      own = inputs
      if inputs.key is not None:
        own = dataclasses.replace(
            inputs, key=jax.random.fold_in(inputs.key, zlib.crc32(term.name.encode()))
        )
      out = term(own, rows.get(term.name), carry.get(term.name))
      total = total + term.weight * out.loss
      per_term[term.name] = out.loss
      if out.rows is not None:
        new_rows[term.name] = out.rows
      new_carry[term.name] = out.carry
      metrics.update(out.metrics)
    return CombinedOutput(total, per_term, new_rows, new_carry, metrics)


def build(loss_config: 'ml_collections.ConfigDict', context: Context) -> Combined:
  """Builds the terms named in ``config.loss``, in a fixed (sorted) order.

  Raises:
    ConfigError: for an unknown term, or invalid settings of a known one.
  """
  terms = []
  for name in sorted(loss_config):
    settings = loss_config[name]
    try:
      module = importlib.import_module(f'{__name__}.{name}')
    except ModuleNotFoundError:
      raise ConfigError(
          f'loss.{name}: unknown loss term; expected a module of skd_jax.terms '
          f'such as cross_entropy, pskd, drg, dsr, lsskd, cskd, dlb'
      ) from None
    if 'weight' not in settings or settings.weight < 0:
      raise ConfigError(f'loss.{name}.weight: expected a non-negative number')
    term = module.make(settings, context)
    known = {f.name for f in dataclasses.fields(term)} - _NOT_SETTINGS
    for key in settings:
      if key not in known:
        raise ConfigError(
            f'loss.{name}.{key}: unknown setting; expected one of ' f'{", ".join(sorted(known))}'
        )
    terms.append(term)
  try:
    return Combined(tuple(terms))
  except ValueError as e:
    raise ConfigError(f'loss: {str(e).removeprefix("terms: ")}') from None


def term_classes() -> dict[str, type]:
  """Every term module of this package and the :class:`LossTerm` class it defines, by name."""
  found = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f'{__name__}.{info.name}')
    for value in vars(module).values():
      if (
          isinstance(value, type)
          and issubclass(value, LossTerm)
          and value.__module__ == module.__name__
      ):
        found[info.name] = value
  return found


def settings() -> dict[str, dict[str, Any]]:
  """Every term module of this package: ``{name: {setting: default}}`` (for ``--help``).

  A setting is a field of the term's dataclass that the config sets; ``name`` and the facts of
  :class:`Context` are not settings.
  """
  return {
      name: {
          f.name: f.default
          for f in dataclasses.fields(cls)
          if f.name not in _NOT_SETTINGS and f.default is not dataclasses.MISSING
      }
      for name, cls in term_classes().items()
  }


def check_range(
    settings, key: str, low: float, high: float, term: str, default: float | None = None
) -> float:
  """Returns ``settings[key]`` (or ``default``) after checking it lies in ``[low, high]``."""
  value = settings.get(key, default)
  if not isinstance(value, (int, float)) or not low <= value <= high:
    raise ConfigError(f'loss.{term}.{key}: expected a number in [{low}, {high}], got {value!r}')
  return float(value)


def check_choice(settings, key: str, choices: tuple[str, ...], term: str, default: str) -> str:
  """Returns ``settings[key]`` (or ``default``) after checking it is one of ``choices``."""
  value = settings.get(key, default)
  if value not in choices:
    raise ConfigError(
        f'loss.{term}.{key}: expected one of {", ".join(map(repr, choices))}, ' f'got {value!r}'
    )
  return value
