r"""TF-KD (self) (Yuan et al., CVPR 2020): an earlier run of the model teaches a fresh copy.

Teacher-free KD with the official ResNet-18 CIFAR-100 weights alpha = 0.95, T = 6, m = 50.

The official loss is ``(1 - alpha) CE + alpha m T^2 KL_mean`` with PyTorch's ``KLDivLoss()``
mean over ``B x C`` elements; as a sum over classes averaged over the batch that is a
``teacher_kd`` weight of ``alpha m / C`` (0.475 for CIFAR-100's 100 classes, 4.75 for
Fashion-MNIST's 10).

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs). The teacher is a
cross-entropy run of the same model (configs/baseline.py with the same protocol):

  python -m skd_jax.main --config=configs/tfkd_self.py --workdir=/tmp/tfkd \
      --config.teacher.workdir=/tmp/teacher

Expected (paper, CIFAR-100 ResNet-18): 77.10% against 75.87% for the baseline.

Offline Fashion-MNIST (`quick`, the baseline's setup), taught by the quick baseline:

  python -m skd_jax.main --config=configs/tfkd_self.py:quick --workdir=/tmp/tfkd_quick \
      --config.teacher.workdir=/tmp/baseline_quick

Measured (2-core CPU, 258 s wall; baseline 277 s in the same series): top-1 90.89%, NLL 0.242, ECE
0.58, AURC 12.7 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib

ALPHA, TEMPERATURE, MULTIPLIER = 0.95, 6.0, 50.0


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  num_classes = 10 if arg.quick else 100  # Fashion-MNIST or CIFAR-100
  config.loss.cross_entropy = dict(weight=1.0 - ALPHA)
  config.loss.teacher_kd = dict(weight=ALPHA * MULTIPLIER / num_classes, temperature=TEMPERATURE)
  return config
