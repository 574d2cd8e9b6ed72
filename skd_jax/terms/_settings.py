"""Building terms from ``config.loss`` and checking their settings (see ``skd_jax.terms``).

A term is a module of this package whose name does not start with ``_`` (``skd_jax.terms.pskd``),
or any importable module a config names by import path (``loss.NAME.module``); either provides
``make(settings, context)`` returning a :class:`~skd_jax.terms.LossTerm`.
"""

import dataclasses
import importlib
import pkgutil
from typing import Any, TYPE_CHECKING

from skd_jax import plugins
from skd_jax.errors import ConfigError
from skd_jax.terms._protocol import Context
from skd_jax.terms._protocol import LossTerm
from skd_jax.terms._combined import Combined

if TYPE_CHECKING:
  # Only a type here: the core install (losses and terms) does not need ml_collections.
  import ml_collections

_PACKAGE = 'skd_jax.terms'
# Term fields a config does not set: the name, and the facts of the run.
_NOT_SETTINGS = {'name'} | {f.name for f in dataclasses.fields(Context)}


def builtin_names() -> list[str]:
  """The built-in terms: the modules of ``skd_jax.terms`` not starting with ``_``, sorted."""
  package = importlib.import_module(_PACKAGE)
  return sorted(i.name for i in pkgutil.iter_modules(package.__path__) if i.name[0] != '_')


def _maker(name: str, settings) -> tuple[Any, str]:
  """``make`` of the term ``loss.NAME`` and the config field that names its module."""
  if 'module' in settings:
    field = f'loss.{name}.module'
    return plugins.load(settings.module, field), field
  if not name.startswith('_'):  # a module whose name starts with _ is never a term
    try:
      return importlib.import_module(f'{_PACKAGE}.{name}').make, f'loss.{name}'
    except ModuleNotFoundError as e:
      if e.name != f'{_PACKAGE}.{name}':  # a built-in term that lacks a dependency
        raise
  raise ConfigError(
      f'loss.{name}: unknown loss term; expected a module of skd_jax.terms such as '
      f"{', '.join(builtin_names())}, or loss.{name}.module='mylab.term' (an import path)"
  )


def build(loss_config: 'ml_collections.ConfigDict', context: Context) -> Combined:
  """Builds the terms named in ``config.loss``, in a fixed (sorted) order.

  A term's name is its key in ``config.loss`` (a plug-in's term is renamed to it), so rows,
  carries and measurements are keyed by what the config says.

  Raises:
    ConfigError: for an unknown term, a plug-in that does not import or has no ``make``, a
      ``make`` that returns no term, or invalid settings.
  """
  terms = []
  for name in sorted(loss_config):
    settings = loss_config[name]
    if not hasattr(settings, 'keys'):
      raise ConfigError(f'loss.{name}: expected a dict of settings with a weight, got {settings!r}')
    make, field = _maker(name, settings)
    if 'weight' not in settings or settings.weight < 0:
      raise ConfigError(f'loss.{name}.weight: expected a non-negative number')
    plugins.check_call(make, field, settings, context)
    term = make(settings, context)
    if not (isinstance(term, LossTerm) and dataclasses.is_dataclass(term)):
      raise ConfigError(
          f'{field}: make() returned {type(term).__name__}; expected a skd_jax.terms.LossTerm '
          'dataclass'
      )
    known = {f.name for f in dataclasses.fields(term)} - _NOT_SETTINGS
    if field.endswith('.module'):
      known.add('module')
    for key in settings:
      if key not in known:
        raise ConfigError(
            f'loss.{name}.{key}: unknown setting; expected one of {", ".join(sorted(known))}'
        )
    if term.name != name:
      term = dataclasses.replace(term, name=name)
    terms.append(term)
  try:
    return Combined(tuple(terms))
  except ValueError as e:
    raise ConfigError(f'loss: {str(e).removeprefix("terms: ")}') from None


def term_classes() -> dict[str, type]:
  """Every built-in term module and the :class:`LossTerm` class it defines, by name."""
  found = {}
  for name in builtin_names():
    module = importlib.import_module(f'{_PACKAGE}.{name}')
    for value in vars(module).values():
      if (
          isinstance(value, type)
          and issubclass(value, LossTerm)
          and value.__module__ == module.__name__
      ):
        found[name] = value
  return found


def settings() -> dict[str, dict[str, Any]]:
  """Every built-in term: ``{name: {setting: default}}`` (for ``--help``).

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
