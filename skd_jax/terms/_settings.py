"""Term settings, declared once on the term's dataclass, and the terms built from ``config.loss``.

A setting is a field of a term's dataclass that a config sets as ``loss.TERM.KEY``. Its type is
the field's annotation (``float``, ``int``, ``bool`` or ``str``, optionally ``| None``), its
default the field's, and :func:`setting` adds the range or the choices it accepts::

  @dataclasses.dataclass(frozen=True)
  class PSKD(terms.LossTerm):
    num_classes: int  # named like a Context field: filled from the run, never set by a config
    num_epochs: int
    weight: float = 1.0  # always a non-negative number
    alpha_T: float = terms.setting(0.8, low=0, high=1)
    storage: str = terms.setting('float32', choices=STORAGES)
    top_k: int = terms.setting(5, low=1)
    name: str = 'pskd'  # the config's key

    def check(self, context):  # only what depends on the run, e.g. top_k < num_classes
      ...

:func:`build` checks every setting a config gives against its declaration (a bool is not an
``int`` or a ``float``; an ``int`` is a ``float``), refuses keys that are not settings, and makes
the term with the defaults for the rest, so a config that omits a key gets exactly what
``--help`` (:func:`settings`) shows. Then the term's :meth:`~skd_jax.terms.LossTerm.check` sees the
run's :class:`Context`. Every refusal is one :class:`~skd_jax.errors.ConfigError` line,
``loss.TERM.KEY: expected ..., got ...``.

A term is a module of this package whose name does not start with ``_`` (``skd_jax.terms.pskd``),
or any importable module a config names by import path (``loss.NAME.module``). The module
defines one :class:`LossTerm` dataclass, or provides ``make(settings, context)`` returning a term;
a ``make`` checks its own settings (:func:`check_range`, :func:`check_choice`) and its ``weight``
is required.
"""

import dataclasses
import importlib
import math
import pkgutil
import types
import typing
from typing import Any, Callable, TYPE_CHECKING

from skd_jax import plugins
from skd_jax.errors import ConfigError
from skd_jax.terms._protocol import Context
from skd_jax.terms._protocol import LossTerm
from skd_jax.terms._combined import Combined

if TYPE_CHECKING:
  # Only a type here: the core install (losses and terms) does not need ml_collections.
  import ml_collections

_PACKAGE = 'skd_jax.terms'
_CONTEXT = frozenset(f.name for f in dataclasses.fields(Context))
# Term fields a config does not set: the name, and the facts of the run.
_NOT_SETTINGS = {'name'} | _CONTEXT
_METADATA = 'skd_jax.terms.setting'
_KINDS = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a term's setting accepts (:func:`settings_of` gives every setting of a term class).

  Attributes:
    default: what a config that omits the key gets (``dataclasses.MISSING``: required).
    kind: ``bool``, ``int``, ``float`` or ``str`` from the field's annotation, or ``tuple`` for
      ``tuple[int, ...]`` (integers, each within ``low`` and ``high``); None accepts any value
      (an annotation of another type).
    optional: the annotation allows None (``int | None``).
    low: the smallest accepted number, or None.
    high: the largest accepted number, or None.
    choices: the accepted values, or None for any value of the kind.
    expects: what an error message says is expected, when not the generic wording.
  """

  # (dataclasses takes a default of MISSING for none: the factory gives it.)
  default: Any = dataclasses.field(default_factory=lambda: dataclasses.MISSING)
  kind: type | None = None
  optional: bool = False
  low: float | None = None
  high: float | None = None
  choices: tuple[Any, ...] | None = None
  expects: str | None = None

  def expectation(self) -> str:
    """``'a number in [0, 1]'``, ``"one of 'sum', 'mean'"``, ...: what :meth:`check` accepts."""
    if self.expects:
      return self.expects
    if self.choices is not None:
      text = 'one of ' + ', '.join(map(repr, self.choices))
    elif self.kind is bool:
      text = 'True or False'
    elif self.kind in (int, float, tuple):
      noun = {int: 'an integer', float: 'a number', tuple: 'a tuple of integers'}[self.kind]
      if self.low is not None and self.high is not None:
        text = f'{noun} in [{self.low}, {self.high}]'
      elif self.low is not None:
        text = f'{noun} >= {self.low}'
      elif self.high is not None:
        text = f'{noun} <= {self.high}'
      else:
        text = 'a finite number' if self.kind is float else noun
    elif self.kind is str:
      text = 'a string'
    else:
      text = 'a value'
    return f'{text} or None' if self.optional else text

  def check(self, value: Any, field: str) -> Any:
    """``value`` (an ``int`` made a ``float`` for a ``float`` setting) if accepted.

    Raises:
      ConfigError: ``'{field}: expected {expectation}, got {value!r}'``.
    """
    if value is None and self.optional:
      return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if self.kind is tuple:  # integers, each in range
      ok = isinstance(value, (tuple, list)) and all(
          isinstance(v, int)
          and not isinstance(v, bool)
          and (self.low is None or v >= self.low)
          and (self.high is None or v <= self.high)
          for v in value
      )
      if not ok:
        raise ConfigError(f'{field}: expected {self.expectation()}, got {value!r}')
      return tuple(value)
    if self.kind is bool:
      ok = isinstance(value, bool)
    elif self.kind is int:
      ok = number and isinstance(value, int)
    elif self.kind is float:
      ok = number and math.isfinite(value)
    elif self.kind is str:
      ok = isinstance(value, str)
    else:
      ok = True
    if ok and self.low is not None:
      ok = number and value >= self.low
    if ok and self.high is not None:
      ok = number and value <= self.high
    if ok and self.choices is not None:
      ok = value in self.choices
    if not ok:
      raise ConfigError(f'{field}: expected {self.expectation()}, got {value!r}')
    return float(value) if self.kind is float else value


def setting(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | list[Any] | None = None,
) -> Any:
  """Declares a term's setting: a dataclass field with its default and what it accepts.

  Use it as a field's default, ``alpha: float = terms.setting(0.5, low=0, high=1)``; the type is
  the annotation's. A field without it is a setting too, checked by its type alone.

  Args:
    default: the value a config that omits the key gets (``--help`` shows it).
    low: the smallest accepted number (inclusive), or None.
    high: the largest accepted number (inclusive), or None.
    choices: the accepted values, or None.
  """
  declared = Setting(low=low, high=high, choices=None if choices is None else tuple(choices))
  return dataclasses.field(default=default, metadata={_METADATA: declared})


def _kind(annotation: Any) -> tuple[type | None, bool]:
  """The setting kind of a field's annotation and whether it allows None."""
  optional = False
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = typing.get_args(annotation)
    optional = type(None) in args
    rest = [a for a in args if a is not type(None)]
    annotation = rest[0] if len(rest) == 1 else None
  if typing.get_origin(annotation) is tuple and typing.get_args(annotation) == (int, ...):
    return tuple, optional
  return (annotation if annotation in _KINDS else None), optional


def settings_of(cls: type) -> dict[str, Setting]:
  """The settings of a :class:`LossTerm` dataclass, by key, in field order.

  Every field is one except ``name`` and those named like a :class:`Context` field (the run
  fills them). ``weight`` is always a non-negative number.
  """
  try:
    hints = typing.get_type_hints(cls)
  except (NameError, TypeError):  # an annotation that does not resolve: take the raw ones
    hints = {}
  found = {}
  for f in dataclasses.fields(cls):
    if f.name in _NOT_SETTINGS or not f.init:
      continue
    declared = f.metadata.get(_METADATA, Setting())
    if f.name == 'weight':
      declared = dataclasses.replace(declared, low=0, expects='a non-negative number')
    kind, optional = _kind(hints.get(f.name, f.type))
    found[f.name] = dataclasses.replace(declared, default=f.default, kind=kind, optional=optional)
  return found


def builtin_names() -> list[str]:
  """The built-in terms: the modules of ``skd_jax.terms`` not starting with ``_``, sorted."""
  package = importlib.import_module(_PACKAGE)
  return sorted(i.name for i in pkgutil.iter_modules(package.__path__) if i.name[0] != '_')


def _classes(module: types.ModuleType) -> list[type]:
  """The :class:`LossTerm` dataclasses that ``module`` defines (not those it imports)."""
  return [
      value
      for value in vars(module).values()
      if isinstance(value, type)
      and issubclass(value, LossTerm)
      and dataclasses.is_dataclass(value)
      and value.__module__ == module.__name__
  ]


def _factory(name: str, settings) -> tuple[type | Callable[..., Any], str]:
  """What makes the term ``loss.NAME`` (its class or its module's ``make``) and the config
  field that names its module."""
  if not hasattr(settings, 'keys'):
    raise ConfigError(f'loss.{name}: expected a dict of settings, got {settings!r}')
  module = None
  if 'module' in settings:
    field = f'loss.{name}.module'
    module = plugins.load_module(settings['module'], field)
  elif not name.startswith('_'):  # a module whose name starts with _ is never a term
    field = f'loss.{name}'
    try:
      module = importlib.import_module(f'{_PACKAGE}.{name}')
    except ModuleNotFoundError as e:
      if e.name != f'{_PACKAGE}.{name}':  # a built-in term that lacks a dependency
        raise
  if module is None:
    raise ConfigError(
        f'loss.{name}: unknown loss term; expected a module of skd_jax.terms such as '
        f"{', '.join(builtin_names())}, or loss.{name}.module='mylab.term' (an import path)"
    )
  make = getattr(module, 'make', None)
  if callable(make):
    return make, field
  classes = _classes(module)
  if len(classes) != 1:
    found = f"several ({', '.join(c.__name__ for c in classes)})" if classes else 'none'
    raise ConfigError(
        f'{field}: module {module.__name__!r} has no function make() and must then define one '
        f'LossTerm dataclass, found {found}'
    )
  return classes[0], field


def _checked(name: str, settings, factory, field: str, context: Context) -> dict[str, Any]:
  """The settings of ``loss.NAME`` after the checks that need no more than their declarations
  (for a class) or the weight and ``make``'s signature (for a ``make``)."""
  plugin = field.endswith('.module')
  if not isinstance(factory, type):
    # A make() reads settings.weight itself, so there it is required.
    weight = Setting(kind=float, low=0, expects='a non-negative number')
    weight.check(settings.get('weight'), f'loss.{name}.weight')
    plugins.check_call(factory, field, settings, context)
    return {}
  declared = settings_of(factory)
  for key in settings:
    if key not in declared and not (plugin and key == 'module'):
      known = sorted(set(declared) | ({'module'} if plugin else set()))
      raise ConfigError(f'loss.{name}.{key}: unknown setting; expected one of {", ".join(known)}')
  for key, spec in declared.items():
    if spec.default is dataclasses.MISSING and key not in settings:
      raise ConfigError(f'loss.{name}.{key}: required; expected {spec.expectation()}')
  return {
      key: declared[key].check(settings[key], f'loss.{name}.{key}')
      for key in settings
      if key in declared
  }


# What a ``make``'s signature is checked with when the run is not known yet (:func:`validate`).
_UNKNOWN_RUN = Context(num_classes=0, num_epochs=0, batch_size=0)


def validate(loss_config: 'ml_collections.ConfigDict') -> None:
  """Checks ``config.loss`` as far as it can be without the run (before any data is loaded).

  Every term must exist (plug-ins are imported), and every setting of a declared term must be
  one and be accepted by its declaration. :func:`build` repeats these checks and adds those that
  need the run's :class:`Context` (a term's ``check``, and everything a ``make`` checks).

  Raises:
    ConfigError: one line naming the first invalid field.
  """
  if not len(loss_config):  # pylint: disable=g-explicit-length-test
    raise ConfigError('loss: expected at least one loss term')
  for name in sorted(loss_config):
    factory, field = _factory(name, loss_config[name])
    _checked(name, loss_config[name], factory, field, _UNKNOWN_RUN)


def from_settings(cls: type, settings, context: Context, name: str | None = None) -> LossTerm:
  """The term ``cls`` from its config settings (a dict) and the run's context.

  Fields named like :class:`Context` fields come from ``context``; every other field is a
  setting, checked against its declaration (:func:`setting`), or its default when ``settings``
  omits it. Then the term's :meth:`~skd_jax.terms.LossTerm.check` sees ``context``.

  >>> import dataclasses
  >>> from skd_jax import terms
  >>> @dataclasses.dataclass(frozen=True)
  ... class Scaled(terms.LossTerm):
  ...   num_classes: int  # from the context
  ...   weight: float = 1.0
  ...   scale: float = terms.setting(2.0, low=0)
  ...   name: str = 'scaled'
  ...   def __call__(self, inputs, rows=None, carry=None): ...
  >>> terms.from_settings(Scaled, {'scale': 3}, terms.Context(10, 1, 8))
  Scaled(num_classes=10, weight=1.0, scale=3.0, name='scaled')
  >>> terms.from_settings(Scaled, {'scale': -1}, terms.Context(10, 1, 8))
  Traceback (most recent call last):
  skd_jax.errors.ConfigError: loss.scaled.scale: expected a number >= 0, got -1

  Args:
    cls: a :class:`LossTerm` dataclass.
    settings: ``config.loss.NAME``, or any mapping of settings.
    context: the run's facts.
    name: the term's name (the config's key); default ``cls``'s own.

  Raises:
    ConfigError: one line naming ``loss.NAME.KEY`` (or ``loss.NAME``).
  """
  name = name or cls.name
  values = _checked(name, settings, cls, f'loss.{name}', context)
  return _made(cls, name, values, context)


def _made(cls: type, name: str, values: dict[str, Any], context: Context) -> LossTerm:
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  facts = {key: getattr(context, key) for key in fields & _CONTEXT}
  if 'name' in fields:
    values = {**values, 'name': name}
  return _context_checked(cls(**facts, **values), context)


def _context_checked(term: LossTerm, context: Context) -> LossTerm:
  checked = term.check(context)
  return term if checked is None else checked


def build(loss_config: 'ml_collections.ConfigDict', context: Context) -> Combined:
  """Builds the terms named in ``config.loss``, in a fixed (sorted) order.

  A term's name is its key in ``config.loss`` (a plug-in's term is renamed to it), so rows,
  carries and measurements are keyed by what the config says.

  Raises:
    ConfigError: for an unknown term, a plug-in that does not import or has neither a LossTerm
      class nor ``make``, a ``make`` that returns no term, or invalid settings.
  """
  terms = []
  for name in sorted(loss_config):
    settings = loss_config[name]
    factory, field = _factory(name, settings)
    values = _checked(name, settings, factory, field, context)
    if isinstance(factory, type):
      terms.append(_made(factory, name, values, context))
      continue
    term = factory(settings, context)
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
    terms.append(_context_checked(term, context))
  try:
    return Combined(tuple(terms))
  except ValueError as e:
    raise ConfigError(f'loss: {str(e).removeprefix("terms: ")}') from None


def term_classes() -> dict[str, type]:
  """Every built-in term module and the :class:`LossTerm` class it defines, by name."""
  found = {}
  for name in builtin_names():
    classes = _classes(importlib.import_module(f'{_PACKAGE}.{name}'))
    if classes:
      found[name] = classes[-1]
  return found


def settings() -> dict[str, dict[str, Any]]:
  """Every built-in term: ``{name: {setting: default}}`` (for ``--help``).

  The defaults are what a config that omits the key gets (required settings are left out).
  """
  return {
      name: {
          key: spec.default
          for key, spec in settings_of(cls).items()
          if spec.default is not dataclasses.MISSING
      }
      for name, cls in term_classes().items()
  }


def check_range(
    settings, key: str, low: float, high: float, term: str, default: float | None = None
) -> float:
  """For a ``make()``: ``settings[key]`` (or ``default``) as a float after checking it is a number
  in ``[low, high]``. A declared term states this with :func:`setting` instead."""
  spec = Setting(kind=float, low=low, high=high)
  return spec.check(settings.get(key, default), f'loss.{term}.{key}')


def check_choice(settings, key: str, choices: tuple[str, ...], term: str, default: str) -> str:
  """For a ``make()``: ``settings[key]`` (or ``default``) after checking it is one of
  ``choices``. A declared term states this with :func:`setting` instead."""
  return Setting(choices=tuple(choices)).check(settings.get(key, default), f'loss.{term}.{key}')
