r"""DLB: self-distillation from the last mini-batch (Shen et al., CVPR 2022), alpha = 1, T = 3.

Each step also trains on the previous step's examples under a new augmentation (a second forward
pass with gradient and its own BatchNorm call) and distils toward the logits the model gave them
one step earlier, carried in the train state sharded with the batch:
``L = CE([z'; z], [y'; y]) + alpha T^2 KL(softmax(sg z_{t-1}/T) || softmax(z'/T))``, the
cross-entropy a mean over both batches (weights 0.5 and 0.5).

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4). Needs
CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/dlb.py --workdir=/tmp/dlb

Expected: the paper's CIFAR-100 numbers are unverified here (docs/methods.md).

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/dlb.py:quick --workdir=/tmp/dlb_quick

Measured (2-core CPU, 605 s wall on a slow day, 2026-12-06, after the first-step fix): top-1
91.51%, NLL 0.232, ECE 1.50, AURC 11.1 (baseline of 2026-11-30: 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.cross_entropy = dict(weight=0.5)
  config.loss.dlb = dict(weight=1.0, alpha=1.0, temperature=3.0, ce_weight=0.5)
  return config
