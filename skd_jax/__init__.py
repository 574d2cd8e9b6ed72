"""skd_jax: self-knowledge distillation in JAX/Flax.

Loss functions live in `skd_jax.losses` (pure, per-example, importable without TFDS or orbax);
composable loss terms in `skd_jax.terms`; the trainer in `skd_jax.train`; `skd_jax.load_model`
loads a trained model (see `skd_jax.export`).

The core (`skd_jax.losses`, `skd_jax.terms`) needs only jax, flax, optax and chex; the trainer
and `load_model` need the `train` extra (`pip install 'skd_jax[train]'`).
"""

# The one place the version is written: setup.cfg reads it (`version = attr:`).
__version__ = '0.1.0'


def __getattr__(name):
  # Imported on first use, so that `import skd_jax.losses` stays free of orbax and Flax modules.
  if name == 'load_model':
    from skd_jax.export import load_model  # pylint: disable=g-import-not-at-top

    return load_model
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
