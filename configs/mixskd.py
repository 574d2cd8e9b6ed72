r"""MixSKD: self-knowledge distillation from mixup (Yang et al., ECCV 2022), Self-KD-Lib's setting.

Each batch and its mixup ``x~ = lam x + (1 - lam) x[perm]`` (one ``lam ~ Beta(0.4, 0.4)`` per
batch) go through the network in one ``2B`` call; branches re-instantiating the later stages on
every shallower stage, the backbone, and a self-teacher over their final maps distil both ways
between the mixture of the originals' outputs and the mixed images' outputs, with feature MSE,
fixed random discriminators and every exit's cross-entropy (T 3; the official CIFAR script's loss:
no mixup cross-entropy, ``mix_ce=False``); see skd_jax/terms/mixskd.py and docs/methods.md. The
term includes the cross-entropies (no ``cross_entropy`` term). Evaluation is the backbone alone.

Variants (``--config=configs/mixskd.py:variant=...``):

* ``selfkd_lib`` (default): Self-KD-Lib's common CIFAR-100 protocol (CIFAR ResNet-18, 200
  epochs, batch 128 originals, so 256 images per step, SGD momentum 0.9, lr 0.1 with 5 warm-up
  epochs, / 10 at 100 and 150, weight decay 5e-4);
* ``official``: winycg/Self-KD-Lib @ ede3062 ``main_mixskd_cifar.py``'s arguments (METHODS.md
  §3.11): batch 64 originals (128 images), 205 epochs, Nesterov, lr / 10 at epochs 105 and 155
  (its milestones 100 and 150 count from the end of the 5 warm-up epochs); with ``quick`` the
  variant changes nothing.

Needs CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/mixskd.py --workdir=/tmp/mixskd

Published (CIFAR-100, CIFAR ResNet-18, top-1 %): Self-KD-Lib's README table 80.32 (CE 76.24 in
the same table, measured on a different network, the PreAct ResNet-18 of its ``main.py``); the
paper's own tables were not checked here (METHODS.md §3.11). Not reproduced here.

Offline Fashion-MNIST (``quick``, the baseline's setup; two branches on the small ResNet's three
stages):

  python -m skd_jax.main --config=configs/mixskd.py:quick --workdir=/tmp/mixskd_quick

Measured (2-core CPU, 1,852 s wall on 2026-12-06 with the test suite running beside it, 266 to
300 img/s; training 1,804 s): top-1 91.02%, NLL 0.751, ECE 37.5, AURC 18.2 (baseline 91.35%, ECE
0.50). The predictions are far less confident than accurate: mean max-probability 0.535 on the
test set at 91.0% accuracy. One seed: no effect on top-1 claimed. In the noisy-label study the
underconfidence goes with the missing mixup cross-entropies (ECE 26.1% without them, 3.5% with
them, both with a 2-epoch warm-up), and with them the small ResNet needs that warm-up (without it
2 of 3 runs collapsed to chance; docs/methods.md, MixSKD):

  python -m skd_jax.main --config=configs/mixskd.py:quick --workdir=/tmp/mixskd_mix_ce \
      --config.loss.mixskd.mix_ce=true --config.optim.warmup_epochs=2

That command, 2026-12-07 on the idle 2-core CPU (748 s wall, two CPU devices): top-1 91.28%, ECE
2.56, NLL 0.258, AURC 12.5, the self-teacher at 90.0% train top-1 (one seed: calibrated, top-1
within noise of the baseline).
"""

from skd_jax import config_lib

VARIANTS = ('selfkd_lib', 'official')


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, variant=VARIANTS)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  if arg.variant == 'official' and not arg.quick:
    config.batch_size = 64
    config.num_epochs = 205
    config.optim.nesterov = True
    config.optim.boundaries = (105, 155)
  config.loss.mixskd = dict(
      weight=1.0, alpha=0.4, temperature=3.0, mix_ce=False, discriminators=True
  )
  return config
