r"""CS-KD + LSSKD from the config alone: same-class partners and rotations in one run.

Terms compose without code: ``cskd`` asks for the partner group and a partner pass without
gradient, ``lsskd`` for four rotated views of the main examples and heads at every stage. Views
apply to the main examples only; each partner is one augmented, unrotated image (docs: the terms
package). Weights and settings are each method's own.

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4).

  python -m skd_jax.main --config=configs/cskd_lsskd.py --workdir=/tmp/cskd_lsskd

Offline Fashion-MNIST (`quick`: 2 epochs, as LSSKD's quick run):

  python -m skd_jax.main --config=configs/cskd_lsskd.py:quick --workdir=/tmp/cskd_lsskd_quick

Measured (2-core CPU, 419 s wall for 2 epochs; baseline 277 s for 8, same series): top-1 86.94%, NLL
0.397, ECE 5.00, AURC 28.7 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  if arg.quick:
    config.num_epochs = 2  # as configs/lsskd.py: each step runs 4 x 128 images and three heads
  config.loss.cross_entropy = dict(weight=1.0)
  config.loss.cskd = dict(weight=1.0, temperature=4.0)
  config.loss.lsskd = dict(weight=1.0, temperature=3.0, pairing='deepest')
  return config
