r"""SD-Dropout: self-knowledge distillation via dropout (Lee et al., arXiv 2208.05642).

Two dropout masks (p = 0.5) on the pooled feature, through the model's own classifier, distil
into each other both ways: ``L = CE(z, y) + lambda T^2 [KL(q^v || q^u) + KL(q^u || q^v)]``,
lambda = 0.1, T = 3, gradients through both sides (the official default; set
``loss.sd_dropout.stop_gradient=True`` for the lab's ``--detach`` runs).

Default: the paper code's CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9 without Nesterov, lr 0.1 / 10 at epochs 100 and 150, weight decay 1e-4). Needs
CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/sd_dropout.py --workdir=/tmp/sd_dropout

Expected: no verified CIFAR-100 number (docs/methods.md).

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/sd_dropout.py:quick --workdir=/tmp/sd_dropout_quick

Measured (2-core CPU, 236 s wall; baseline 277 s in the same series): top-1 91.46%, NLL 0.269, ECE
4.77, AURC 11.8 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  if not arg.quick:
    config.optim.warmup_epochs = 0
    config.optim.weight_decay = 1e-4
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.sd_dropout = dict(weight=0.1, rate=0.5, temperature=3.0, stop_gradient=False)
  return config
