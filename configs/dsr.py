r"""DSR: LightSKD's distillation with shape-wise regularization (Xu et al., arXiv 2305.09183).

Each example's sorted logits are distilled toward the sorted logits of the previous step's
example in the same batch position: ``L = CE(z, y) + beta T^2 KL(sg(sort z_{t-1}) -> sort z_t)``,
beta = 1, T = 4. The previous step's sorted logits are carried in the train state and in
checkpoints (across epochs; only a run's very first step has none).

Default: LightSKD's CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD momentum 0.9,
lr 0.1 / 10 at epochs 60, 120 and 160, weight decay 5e-4). Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/dsr.py --workdir=/tmp/dsr

Expected: per-table numbers of the paper are unverified (docs/methods.md, "LightSKD").

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/dsr.py:quick --workdir=/tmp/dsr_quick

Measured (2-core CPU, 243 s wall; baseline 233 s): top-1 91.14%, NLL 0.285, ECE 5.06, AURC 14.2
(baseline 91.35%, ECE 0.50). Step time equals the baseline's (ratio 1.00).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='lightskd')
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.dsr = dict(weight=1.0, temperature=4.0)  # weight is beta
  return config
