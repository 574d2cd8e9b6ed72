"""Every docstring example of the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import skd_jax

MODULES = sorted(info.name for info in pkgutil.walk_packages(skd_jax.__path__, prefix='skd_jax.'))


@pytest.mark.parametrize('name', MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)  # a module that does not import fails here
  result = doctest.testmod(
      module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
  )
  assert result.failed == 0, f'{result.failed} of {result.attempted} examples failed in {name}'
  if name.startswith('skd_jax.losses._'):
    assert result.attempted > 0


def test_every_public_loss_has_an_example():
  from skd_jax import losses  # pylint: disable=g-import-not-at-top

  finder = doctest.DocTestFinder()
  for name in losses.__all__:
    examples = finder.find(getattr(losses, name), name)
    assert examples and examples[0].examples, name
