"""Code from outside skd_jax, named in a config by import path.

A config may name its own loss term, model, optimizer and data by the import path of a module that
provides a ``make`` function, or for a term a ``LossTerm`` class with declared settings (README:
"Your own terms, models and optimizers")::

  config.loss.penalty = dict(module='mylab.penalty', weight=0.1)  # a LossTerm class, or make()
  config.model.module = 'mylab.nets'  # make(*, num_classes, dtype, **model options)
  config.optim.module = 'mylab.opt'  # make(optim, schedule) -> optax.GradientTransformation
  config.data.module = 'mylab.data'  # make(data, split) -> skd_jax.data.Dataset

The module is imported as any installed code is (``pip install -e``, or ``PYTHONPATH``): the
config names it, the run's ``config.json`` records the path (changing it on resume is refused),
and an exported model records it in its spec, so ``skd_jax.load_model`` imports it again.
"""

import importlib
import inspect
import types
from typing import Any, Callable

from skd_jax.errors import ConfigError, first_line


def is_path(value: Any) -> bool:
  """Whether ``value`` is a dotted import path of a module (``'mylab.nets'``, ``'mynets'``)."""
  return (
      isinstance(value, str)
      and bool(value)
      and all(part.isidentifier() for part in value.split('.'))
  )


def load_module(path: Any, field: str) -> types.ModuleType:
  """The module at import path ``path``.

  Raises:
    ConfigError: one line naming ``field``: ``path`` is not an import path, or the module does
      not import (its own error, e.g. a missing dependency, is quoted).
  """
  if not is_path(path):
    raise ConfigError(
        f"{field}: expected a module's import path such as 'mylab.nets', got {path!r}"
    )
  try:
    return importlib.import_module(path)
  except Exception as e:  # a plug-in may fail to import in any way  # pylint: disable=broad-except
    raise ConfigError(
        f'{field}: cannot import {path!r} ({type(e).__name__}: {first_line(e)}); is it installed '
        'or on PYTHONPATH?'
    ) from None


def load(path: Any, field: str, attribute: str = 'make') -> Callable[..., Any]:
  """The function ``attribute`` of the module at import path ``path``.

  Args:
    path: the import path, as the config gives it.
    field: the config field that gave it, e.g. ``'loss.penalty.module'``, for the error.
    attribute: the function the module must provide.

  Raises:
    ConfigError: one line naming ``field``: ``path`` is not an import path, the module does not
      import (its own error, e.g. a missing dependency, is quoted), or it has no such function.
  """
  function = getattr(load_module(path, field), attribute, None)
  if not callable(function):
    raise ConfigError(f'{field}: module {path!r} has no function {attribute}()')
  return function


def check_call(function: Callable[..., Any], field: str, *args: Any, **kwargs: Any) -> None:
  """Raises ConfigError naming ``field`` unless ``function``'s signature accepts these arguments.

  Only the signature is checked, so an error inside a plug-in's ``make`` is still its own.
  """
  try:
    inspect.signature(function).bind(*args, **kwargs)
  except TypeError as e:
    call = ', '.join([type(a).__name__ for a in args] + [f'{k}=' for k in kwargs])
    raise ConfigError(
        f'{field}: make{inspect.signature(function)} cannot be called as make({call}) ({e})'
    ) from None
  except ValueError:  # no signature to check (a builtin): the call itself will say
    pass
