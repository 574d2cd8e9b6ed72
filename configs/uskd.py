r"""USKD: universal self-knowledge distillation (Yang et al., ICCV 2023; arXiv 2303.13005).

A weak linear classifier on the pooled output of the second-to-last stage, trained with
label-smoothed cross-entropy, ranks the classes; the final head learns its cross-entropy plus a
target term (soft label: its own squared target probability shifted to a batch mean of 1) and a
normalized non-target term (Zipf weights over the ranking): ``L = CE(z, y) + alpha L_t +
beta L_non + mu L_w``, alpha = beta = mu = 0.1 (the official CIFAR-100 config
``configs/distillers/cifar100/res18_sd_cifar.py``). The target term's batch mean is over groups
of 16 examples, the official per-GPU batch (8 GPUs x 16). The head is training-only: the
evaluated and exported model is the plain backbone.

Default: the official CIFAR-100 protocol (github.com/yzd-v/cls_KD @ ad4876f, mmcls 0.x: CIFAR
ResNet-18, 200 epochs, batch 128, SGD momentum 0.9, lr 0.1 x 0.2 at epochs 60, 120 and 160,
weight decay 5e-4). Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/uskd.py --workdir=/tmp/uskd

Expected: no verified CIFAR-100 number (the official README reports ImageNet only, e.g.
ResNet-18 69.90 -> 70.79 top-1; docs/methods.md, "USKD").

Offline Fashion-MNIST (`quick`, the baseline's setup, the head on stage 2 of 3):

  python -m skd_jax.main --config=configs/uskd.py:quick --workdir=/tmp/uskd_quick

Measured (2-core CPU, 2,018 s wall on 2026-12-06 with the machine shared by four other jobs, load
average ~13: ~245 img/s, so the wall time says nothing of the method's cost; the head is 330
parameters): top-1 91.37%, NLL 0.247, ECE 0.27, AURC 11.7 (baseline 91.35%, ECE 0.50); the weak
head's training top-1 ~84%.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='lightskd')
  if not arg.quick:
    config.optim.decay_factor = 0.2
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.uskd = dict(weight=1.0, alpha=0.1, beta=0.1, mu=0.1, group_size=16)
  return config
