r"""Beta smoothing (Zhang & Sabuncu, NeurIPS 2020), alpha = 0.6, Beta(3, 1).

Self-distillation as instance-specific label smoothing.

An EMA copy of the model (decay min(1 - 1/(t + 2), 0.999) at its update t = 0, 1, ...) ranks the
batch by true-class confidence; sorted draws from Beta(3, 1) become the per-example target
confidences: ``L = (1 - alpha) CE + alpha H(target, z)``. The EMA copy's test metrics are reported
beside the student's (``ema/top1`` ... in metrics.jsonl and summary.json).

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4). Needs
CIFAR-100 through TFDS.

  python -m skd_jax.main --config=configs/beta_smoothing.py --workdir=/tmp/beta_smoothing

Expected: the paper's CIFAR-100 numbers are unverified here (docs/methods.md).

Offline Fashion-MNIST (`quick`, the baseline's setup):

  python -m skd_jax.main --config=configs/beta_smoothing.py:quick --workdir=/tmp/beta_quick

Measured (2-core CPU, 405 s wall on a slow day, 2026-12-06, after the EMA-decay fix): top-1
90.91%, NLL 0.374, ECE 11.44, AURC 17.3; EMA copy 80.74%, ECE 24.68 (baseline of 2026-11-30:
91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.cross_entropy = dict(weight=0.4)  # 1 - alpha
  config.loss.beta_smoothing = dict(weight=0.6, a=3.0, b=1.0, ema_max_decay=0.999)  # alpha
  return config
