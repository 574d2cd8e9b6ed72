r"""Label smoothing (epsilon = 0.1, uniform variant) -- the "LS" column of the PS-KD paper.

Default: the PS-KD paper's CIFAR-100 protocol (see configs/baseline.py). Needs CIFAR-100 through
TFDS (internet on first use).

  python -m skd_jax.main --config=configs/label_smoothing.py --workdir=/tmp/ls

Expected (official PS-KD README): top-1 error 20.94%, i.e. top-1 ~79.1%, ECE 10.79, AURC 57.74.

Offline Fashion-MNIST:

  python -m skd_jax.main --config=configs/label_smoothing.py:quick --workdir=/tmp/ls_quick

Runs in about 4 minutes on a 2-core CPU.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.label_smoothing = dict(weight=1.0, epsilon=0.1, variant='uniform')
  return config
