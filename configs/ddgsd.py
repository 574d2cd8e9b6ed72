r"""DDGSD: data-distortion guided self-distillation (Xu & Liu, AAAI 2019), Self-KD-Lib's setting.

Every image is seen under two independent draws of the training augmentation (the source's
``'again'`` group), both in one ``2B`` batch; per example
``L = a (CE(z1, y) + CE(z2, y)) + T^2 (KL(sg q2 || q1) + KL(sg q1 || q2)) + mu M``, ``M`` the
linear-kernel MMD between the two views' batches of pooled features (docs/methods.md, "DDGSD").
The term includes both cross-entropies (no ``cross_entropy`` term).

Variants (``--config=configs/ddgsd.py:variant=...``), there being no official code:

* ``selfkd_lib`` (default): winycg/Self-KD-Lib @ ede3062 ``methods/ddsgd.py``, the common
  self-KD table's run: ``a = 1/4`` (its cross-entropy is a mean over the 2B logits, halved),
  T = 4, ``mu = 5e-4`` on the squared difference of the two views' scalar feature means;
* ``yechanp``: yechanp/self_kd @ 9abb7e5 ``models/methods.py``: ``a = 1``, T = 3,
  ``mu = 0.005`` on the squared distance of the two mean feature vectors.

Default: Self-KD-Lib's CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128 examples, so
256 images per step, SGD momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150,
weight decay 5e-4). Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/ddgsd.py --workdir=/tmp/ddgsd

Expected: Self-KD-Lib's README table reports 76.61% top-1 (CE 76.24%, on its PreAct ResNet-18);
the paper's CIFAR-100 ResNet-18 error 23.45 -> 21.47 (76.55 -> 78.53% top-1) is quoted by a
reader, unverified.

Offline Fashion-MNIST (``quick``, the baseline's setup):

  python -m skd_jax.main --config=configs/ddgsd.py:quick --workdir=/tmp/ddgsd_quick

Measured (2-core CPU, 3,800 s wall on 2026-12-06 with the machine shared by four other jobs,
load up to ~17, 75 to 160 img/s, so the wall time says nothing of the method's cost; training
3,717 s): top-1 90.62%, NLL 0.270, ECE 3.14, AURC 13.7 (baseline 91.35%, ECE 0.50).
"""

from skd_jax import config_lib

VARIANTS = {
    'selfkd_lib': dict(ce_weight=0.25, temperature=4.0, mmd='scalar', mmd_weight=5e-4),
    'yechanp': dict(ce_weight=1.0, temperature=3.0, mmd='vector', mmd_weight=0.005),
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, variant=tuple(VARIANTS))
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.ddgsd = dict(weight=1.0, kl_weight=1.0, batchnorm='joint', **VARIANTS[arg.variant])
  return config
