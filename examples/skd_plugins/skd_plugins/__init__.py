"""Example plug-ins for skd_jax, named in a config by import path (see ``config.py`` here).

* ``skd_plugins.confidence_penalty``: a loss term (``config.loss.NAME.module``);
* ``skd_plugins.nets``: a small CNN (``config.model.module``);
* ``skd_plugins.adamw``: AdamW (``config.optim.module``);
* ``skd_plugins.npz_data``: image classification data from NumPy files (``config.data.module``).

Each module provides ``make``, as skd_jax's own terms do; nothing in skd_jax is changed or forked.
"""
