"""Composable loss terms: the unit a method is built from.

A method is a weighted sum of terms, named in the config::

  config.loss.pskd = dict(weight=1.0, alpha_T=0.8)

The trainer imports ``skd_jax.terms.<name>`` and calls its ``make(settings, context)``, so a new
method is a new module here plus a config file; the trainer does not change.

A term is pure: it maps :class:`TermInputs` (what the forward pass produced for the batch) plus its
own state to per-example losses and its next state. It declares what it needs beyond the final
logits:

* named intermediates of the backbone (``inputs.outputs['stage2']``), always there;
* training-only auxiliary heads (:meth:`LossTerm.heads`), attached at named stages; their logits
  appear in ``inputs.outputs`` under the head's name, and the evaluated and exported model never
  contains them;
* extra views of the batch (:attr:`LossTerm.num_views`, :meth:`LossTerm.make_views`), e.g. LSSKD's
  four rotations: the model then sees ``B * V`` images, ``inputs.logits`` / ``inputs.outputs``
  hold the original view and ``inputs.views`` every view;
* state, of two kinds, both created by the term, stored in the train state and in every
  checkpoint:

  * ``rows``: one row per training example (e.g. PS-KD's history of past predictions,
    ``[N, C]``). The trainer keeps the table sharded along examples with the data, hands the term
    the rows of the batch's examples, and writes back the rows the term returns (skipping padding
    and duplicate indices), moving only ``O(batch x classes)`` per step.
  * ``carry``: a small pytree carried from one step to the next (e.g. DSR's previous sorted
    logits), replicated on every device.

:class:`Combined` sums weighted terms (``optax.chain``'s role for losses): it is what the trainer
uses, and other JAX code can call it, or any single term, on plain arrays.
"""

import abc
import dataclasses
import importlib
import pkgutil
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from skd_jax.errors import ConfigError


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
  """

  logits: jax.Array
  labels: jax.Array
  outputs: Mapping[str, jax.Array] = dataclasses.field(default_factory=dict)
  epoch: Any = 0
  views: Mapping[str, jax.Array] | None = None

  def __post_init__(self):
    if self.views is None:
      single = {'logits': self.logits, **self.outputs}
      object.__setattr__(self, 'views', {k: v[:, None] for k, v in single.items()})

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
  ) -> 'TermInputs':
    """Inputs from a forward pass over ``B * num_views`` images laid out example-major."""
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


# Term fields a config does not set: the name, and the facts of the run.
_NOT_SETTINGS = {'name'} | {f.name for f in dataclasses.fields(Context)}


class LossTerm(abc.ABC):
  """Base class of loss terms. Subclasses are frozen dataclasses with a ``weight`` field.

  Override ``__call__`` always; ``init_rows`` / ``init_carry`` for stateful terms; ``heads`` for
  terms that need auxiliary heads; ``num_views`` and ``make_views`` for terms that need extra
  views of each example.
  """

  name: str
  weight: float
  num_views: int = 1

  def init_rows(self, labels: jax.Array) -> jax.Array | None:
    """Initial per-example state from the ``[N]`` training labels, or None."""
    del labels
    return None

  def init_carry(self) -> Any:
    """Initial step-to-step state (arrays of static shape), or None."""
    return None

  def heads(self, backbone) -> tuple[Any, ...]:
    """Training-only heads (``skd_jax.models.Head``) this term needs on ``backbone``.

    Raises:
      ConfigError: when the backbone cannot carry them.
    """
    del backbone
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
  every term then sees the same ``B * V`` forward pass.
  """

  terms: tuple[LossTerm, ...]

  def __post_init__(self):
    names = [t.name for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'terms: names must be unique, got {names}')
    viewers = [t.name for t in self.terms if t.num_views > 1]
    if len(viewers) > 1:
      raise ValueError(
          f'terms: {" and ".join(viewers)} both add views of the batch; at most ' 'one term may'
      )

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

  def heads(self, backbone) -> tuple[Any, ...]:
    """Every term's heads on ``backbone``; names must not collide."""
    heads = tuple(h for t in self.terms for h in t.heads(backbone))
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
      raise ConfigError(f'loss: two terms attach heads with the same name: {names}')
    return heads

  def init_rows(self, labels: jax.Array) -> dict[str, jax.Array]:
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
    """Calls every term on the same inputs with its own rows and carry; sums weighted losses."""
    rows, carry = rows or {}, carry or {}
    total, per_term, new_rows, new_carry, metrics = 0.0, {}, {}, {}, {}
    for term in self.terms:
      out = term(inputs, rows.get(term.name), carry.get(term.name))
      total = total + term.weight * out.loss
      per_term[term.name] = out.loss
      if out.rows is not None:
        new_rows[term.name] = out.rows
      new_carry[term.name] = out.carry
      metrics.update(out.metrics)
    return CombinedOutput(total, per_term, new_rows, new_carry, metrics)


def build(loss_config: ml_collections.ConfigDict, context: Context) -> Combined:
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
          f'such as cross_entropy, pskd, drg, dsr, lsskd'
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


def settings() -> dict[str, dict[str, Any]]:
  """Every term module of this package: ``{name: {setting: default}}`` (for ``--help``).

  A setting is a field of the term's dataclass that the config sets; ``name`` and the facts of
  :class:`Context` are not settings.
  """
  found = {}
  for info in pkgutil.iter_modules(__path__):
    module = importlib.import_module(f'{__name__}.{info.name}')
    for value in vars(module).values():
      if (
          isinstance(value, type)
          and issubclass(value, LossTerm)
          and value.__module__ == module.__name__
      ):
        found[info.name] = {
            f.name: f.default
            for f in dataclasses.fields(value)
            if f.name not in _NOT_SETTINGS and f.default is not dataclasses.MISSING
        }
  return found


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
