r"""DRG: LightSKD's distillation with reverse guidance (Xu et al., arXiv 2305.09183).

A light attention + separable-convolution head on stage 2, trained with cross-entropy, teaches
the final head: ``L = CE(z, y) + CE(z^a, y) + alpha T^2 KL(sg(z^a) -> z)``, alpha = 0.2, T = 4.
The head is training-only: the evaluated and exported model is the plain backbone.

Default: LightSKD's CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD momentum 0.9,
lr 0.1 / 10 at epochs 60, 120 and 160, weight decay 5e-4). Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/drg.py --workdir=/tmp/drg

Expected: the paper reports gains of "up to 2.87%" over the baseline; its per-table numbers are
unverified (docs/methods.md, "LightSKD").

Offline Fashion-MNIST (`quick`, the baseline's setup with the head on stage 2 of 3):

  python -m skd_jax.main --config=configs/drg.py:quick --workdir=/tmp/drg_quick

Measured (2-core CPU, 426 s wall; baseline 233 s): top-1 91.56%, NLL 0.223, ECE 0.55, AURC 10.7
(baseline 91.35%, ECE 0.50). Train steps take 1.75x the baseline's here: on the tiny quick
backbone the head is a large share of the compute.
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='lightskd')
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.drg = dict(weight=1.0, alpha=0.2, temperature=4.0, stage=2)
  return config
