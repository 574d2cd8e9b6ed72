r"""Label smoothing (epsilon = 0.1, uniform variant) -- the "LS" column of the PS-KD paper.

Default: the PS-KD paper's CIFAR-100 protocol (see configs/baseline.py). Needs CIFAR-100 through
TFDS (internet on first use).

  python -m skd_jax.main --config=configs/label_smoothing.py --workdir=/tmp/ls

Expected (official PS-KD README): top-1 error 20.94%, i.e. top-1 ~79.1%, ECE 10.79, AURC 57.74.

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/label_smoothing.py:quick --workdir=/tmp/ls_quick

Measured (2-core CPU, 266 s wall; baseline 233 s): top-1 91.57%, NLL 0.311, ECE 8.71, AURC 12.1
(baseline 91.35%, ECE 0.50). Smoothing with eps = 0.1 makes the model underconfident on this
easy dataset, hence the high ECE and NLL.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.label_smoothing = dict(weight=1.0, epsilon=0.1, variant='uniform')
  return config
