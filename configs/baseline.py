r"""Cross-entropy baseline.

Default: the PS-KD paper's CIFAR-100 protocol (PreAct ResNet-18, 300 epochs, batch 128, SGD with
Nesterov momentum, lr 0.1 / 10 at epochs 150 and 225, weight decay 5e-4). Needs CIFAR-100 through
TFDS (internet on first use).

  python -m skd_jax.main --config=configs/baseline.py --workdir=/tmp/baseline

Expected (official PS-KD README, best epoch): top-1 error 24.18%, i.e. top-1 ~75.8%, ECE 11.84,
AURC 67.65.

Offline Fashion-MNIST (`quick`: small ResNet, 8 epochs, about 4 minutes on a 2-core CPU):

  python -m skd_jax.main --config=configs/baseline.py:quick --workdir=/tmp/baseline_quick

Measured (2-core CPU, 233 s wall): top-1 91.35%, NLL 0.232, ECE 0.50, AURC 11.9.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.cross_entropy = dict(weight=1.0)
  return config
