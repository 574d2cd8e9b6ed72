"""Composable loss terms: the unit a method is built from.

A method is a weighted sum of terms, named in the config::

  config.loss.pskd = dict(weight=1.0, alpha_T=0.8)

The trainer imports ``skd_jax.terms.<name>`` and calls its ``make(settings, context)``, so a new
method is a new module here plus a config file; the trainer does not change.

A term is pure: it maps :class:`TermInputs` (what the forward pass produced for the batch) plus its
own state to per-example losses and its next state. Two kinds of state exist, both created by the
term, stored in the train state and in every checkpoint:

* ``rows``: one row per training example (e.g. PS-KD's history of past predictions, ``[N, C]``).
  The trainer keeps the table sharded along examples with the data, hands the term the rows of the
  batch's examples, and writes back the rows the term returns (skipping padding and duplicate
  indices), moving only ``O(batch x classes)`` per step.
* ``carry``: a small pytree carried from one step to the next (e.g. the previous batch's sorted
  logits), replicated on every device.
"""

import abc
import dataclasses
import importlib
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections

from skd_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """What a term sees of one training step.

  Attributes:
    logits: ``[B, C]`` final-head logits (float32).
    outputs: the model's named intermediates (stage features, auxiliary-head logits).
    labels: ``[B]`` integer labels.
    one_hot: ``[B, C]`` float32 one-hot labels.
    epoch: 0-based epoch, an int32 scalar.
  """
  logits: jax.Array
  outputs: Mapping[str, jax.Array]
  labels: jax.Array
  one_hot: jax.Array
  epoch: jax.Array


class TermOutput(NamedTuple):
  """A term's result: per-example ``loss`` ``[B]``, next ``rows`` and ``carry``, and metrics."""
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


class LossTerm(abc.ABC):
  """Base class of loss terms. Subclasses are frozen dataclasses with a ``weight`` field.

  Override ``init_rows`` / ``init_carry`` for stateful terms and ``__call__`` always.
  """
  name: str
  weight: float

  def init_rows(self, labels: jax.Array) -> jax.Array | None:
    """Initial per-example state from the ``[N]`` training labels, or None."""
    del labels
    return None

  def init_carry(self) -> Any:
    """Initial step-to-step state (arrays of static shape), or None."""
    return None

  @abc.abstractmethod
  def __call__(self, inputs: TermInputs, rows: Any, carry: Any) -> TermOutput:
    """Per-example losses for the batch, with the batch's new rows and the next carry."""


def build(loss_config: ml_collections.ConfigDict, context: Context) -> tuple[LossTerm, ...]:
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
      raise ConfigError(f'loss.{name}: unknown loss term; expected a module of skd_jax.terms '
                        f'such as cross_entropy, label_smoothing, pskd') from None
    if 'weight' not in settings or settings.weight < 0:
      raise ConfigError(f'loss.{name}.weight: expected a non-negative number')
    terms.append(module.make(settings, context))
  return tuple(terms)


def check_range(settings, key: str, low: float, high: float, term: str) -> float:
  """Returns ``settings[key]`` after checking it lies in ``[low, high]``."""
  value = settings.get(key)
  if not isinstance(value, (int, float)) or not low <= value <= high:
    raise ConfigError(f'loss.{term}.{key}: expected a number in [{low}, {high}], got {value!r}')
  return float(value)
