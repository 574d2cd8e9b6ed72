r"""PS-KD + DLB from the config alone: a per-example history and the previous batch in one run.

``pskd`` keeps its history rows, ``dlb`` the previous step's logits (sharded with the batch) and
a second forward pass over the previous step's examples; each term's state is its own, in every
checkpoint.

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4).

  python -m skd_jax.main --config=configs/pskd_dlb.py --workdir=/tmp/pskd_dlb

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/pskd_dlb.py:quick --workdir=/tmp/pskd_dlb_quick

Measured (2-core CPU, 403 s wall; baseline 277 s in the same series): top-1 91.30%, NLL 0.252, ECE
2.97, AURC 12.1 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.pskd = dict(weight=0.5, alpha_T=0.8)  # PS-KD's target in DLB's CE half
  config.loss.dlb = dict(weight=1.0, alpha=1.0, temperature=3.0, ce_weight=0.5)
  return config
