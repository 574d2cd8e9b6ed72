r"""DKS: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019), with Self-KD-Lib's settings.

Auxiliary classifier branches after the shallow stages (re-instantiated later stages, see
skd_jax/terms/dks.py) learn from the labels, and every classifier, the final one included, is
matched to every other one (stop-gradient teacher) by a T = 4 KL scaled by T^2. This is
winycg/Self-KD-Lib @ ede3062 ``methods/dks.py`` with ``DistillKL(T=4)`` (``main.py --T``
default): every classifier's cross-entropy and every one of the 6 ordered-pair KLs with weight 1
(``loss = loss_cls + loss_div``), branches on stages 2 and 3 as in its ``CIFAR_ResNet18_dks``
(whose stage-2 branch has one block in its stage-3 copy where ours has two). The authors' code
(sundw2014/DKS, WRN) matches at T = 1: ``temperature=1.0``; see docs/methods.md.

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4). Needs
CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/dks.py --workdir=/tmp/dks

Published (CIFAR-100, ResNet-18, top-1 % of the final classifier, Self-KD-Lib's table): cross-
entropy 76.24, DKS 78.64. The authors' README: WRN-28-10 test error 18.72 -> 17.24 (CIFAR-100);
ImageNet ResNet-18 top-1 error 31.06 -> 28.68. Not reproduced here.

Offline Fashion-MNIST (the baseline's quick setup, 8 epochs, branches on both shallow stages of
its 3-stage ResNet):

  python -m skd_jax.main --config=configs/dks.py:quick --workdir=/tmp/dks_quick

Measured (2-core CPU, 2,914 s wall on 2026-12-06 with the machine shared by four other helpers'
tests and runs, 150-400 img/s; training 2,869 s): top-1 91.50%, NLL 0.236, ECE 0.72, AURC 11.9
(baseline 91.35%, ECE 0.50); the branches' last training top-1: 90.9% (stage 1), 90.4% (stage 2).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.dks = dict(
      weight=1.0,
      temperature=4.0,
      t2_scaling=True,
      synergy_weight=1.0,
      first_stage=2,
  )
  if arg.quick:
    config.loss.dks.first_stage = 1  # the quick ResNet has 3 stages: branches on stages 1 and 2
  return config
