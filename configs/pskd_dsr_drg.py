r"""PS-KD + DSR + DRG in one run: three self-distillation signals composed from the config.

  L = H((1 - a_t) y + a_t P[idx], z)                       PS-KD (soft-target mixing)
    + CE(z^a, y) + alpha T^2 KL(sg(z^a) -> z)              DRG (auxiliary-head distillation)
    + beta T^2 KL(sg(sort z_{t-1}) -> sort z_t)            DSR (rank-shape regularization)

PS-KD replaces the plain cross-entropy (its target contains the label). Each term is computed as
it would be alone and the weighted sum is the loss (tests/test_train.py checks this in the
trainer).

Default: the PS-KD paper's CIFAR-100 protocol (PreAct ResNet-18, 300 epochs, batch 128, SGD with
Nesterov momentum, lr 0.1 / 10 at epochs 150 and 225, weight decay 5e-4). Needs CIFAR-100.

  python -m skd_jax.main --config=configs/pskd_dsr_drg.py --workdir=/tmp/pskd_dsr_drg

Expected: no published number for this combination.

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/pskd_dsr_drg.py:quick --workdir=/tmp/pskd_dsr_drg_quick

Measured (2-core CPU, 420 s wall; baseline 233 s): top-1 90.30%, NLL 0.283, ECE 2.74, AURC 15.2
(baseline 91.35%; PS-KD alone 90.73%); steps take 1.82x the baseline's.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.pskd = dict(weight=1.0, alpha_T=0.8)
  config.loss.drg = dict(weight=1.0, alpha=0.2, temperature=4.0, stage=2)
  config.loss.dsr = dict(weight=1.0, temperature=4.0)
  return config
