r"""CS-KD: class-wise self-knowledge distillation (Yun et al., CVPR 2020), lambda = 1, T = 4.

Every anchor gets a same-class partner (drawn with replacement from (seed, step), independently
augmented); the student's prediction on the partner, from a forward pass without gradient and
with its own BatchNorm call, teaches its prediction on the anchor:
``L = CE(z(x), y) + lambda T^2 KL(softmax(sg z(x')/T) || softmax(z(x)/T))``.

Default: the CS-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128 anchors + 128
partners, SGD momentum 0.9, lr 0.1 / 10 at epochs 100 and 150, weight decay 1e-4). Needs
CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/cskd.py --workdir=/tmp/cskd

Expected: Self-KD-Lib's common table (different protocol, docs/methods.md) reports 78.66% for
CS-KD against 76.24% for cross-entropy.

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/cskd.py:quick --workdir=/tmp/cskd_quick

Measured (2-core CPU, 350 s wall; baseline 277 s in the same series): top-1 91.43%, NLL 0.304, ECE
8.63, AURC 12.3 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  if not arg.quick:
    config.optim.warmup_epochs = 0
    config.optim.weight_decay = 1e-4
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.cskd = dict(weight=1.0, temperature=4.0)  # weight is lambda
  return config
