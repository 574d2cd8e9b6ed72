"""skd_jax: self-knowledge distillation in JAX/Flax.

Loss functions live in `skd_jax.losses` (pure, per-example, importable without TFDS or orbax);
composable loss terms in `skd_jax.terms`; the trainer in `skd_jax.train`.
"""
