r"""The baseline with a confidence penalty, a small CNN and AdamW, all from skd_plugins.

  pip install -e examples/skd_plugins  # or: export PYTHONPATH=examples/skd_plugins
  python -m skd_jax.main --config=examples/skd_plugins/config.py:quick --workdir=/tmp/plugins

``quick``: offline Fashion-MNIST, 8 epochs, as configs/baseline.py:quick.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.confidence_penalty = dict(module='skd_plugins.confidence_penalty', weight=0.1)
  config.model.module = 'skd_plugins.nets'
  config.model.name = 'small_cnn'  # a label in logs; the module builds the model
  config.model.widths = (16, 32, 64)
  config.model.strides = (2, 2, 2)
  config.optim.module = 'skd_plugins.adamw'
  config.optim.lr = 1e-3
  config.optim.weight_decay = 0.05
  config.optim.b2 = 0.999
  return config
