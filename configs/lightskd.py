r"""LightSKD: DRG and DSR together (Xu et al., arXiv 2305.09183).

  L = CE(z, y) + CE(z^a, y) + alpha T^2 KL(sg(z^a) -> z) + beta T^2 KL(sg(sort z_{t-1}) -> sort z_t)

with alpha = 0.2, beta = 1, T = 4 (see configs/drg.py and configs/dsr.py).

Default: LightSKD's CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD momentum 0.9,
lr 0.1 / 10 at epochs 60, 120 and 160, weight decay 5e-4). Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/lightskd.py --workdir=/tmp/lightskd

Expected: "up to 2.87%" over baselines and "up to 1.15%" over other self-KD methods (the
paper's abstract; per-table numbers unverified).

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/lightskd.py:quick --workdir=/tmp/lightskd_quick

Measured (2-core CPU, 414 s wall; baseline 233 s): top-1 91.12%, NLL 0.251, ECE 2.17, AURC 12.6
(baseline 91.35%, ECE 0.50); steps take 1.79x the baseline's.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='lightskd')
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.drg = dict(weight=1.0, alpha=0.2, temperature=4.0, stage=2)
  config.loss.dsr = dict(weight=1.0, temperature=4.0)
  return config
