r"""Teacher KD (Hinton et al., 2015), alpha = 0.9, T = 4; born-again generations with --generations.

Born-again networks: Furlanello et al., ICML 2018.

The teacher is any earlier run's export, in evaluation mode, never trained and not part of this
run's checkpoints: ``L = (1 - alpha) CE + alpha T^2 KL(softmax(z_t/T) || softmax(z/T))``.

Default: the common self-KD CIFAR-100 protocol (CIFAR ResNet-18, 200 epochs, batch 128, SGD
momentum 0.9, lr 0.1 with 5 warm-up epochs, / 10 at 100 and 150, weight decay 5e-4). Needs
CIFAR-100 through TFDS and a teacher run:

  python -m skd_jax.main --config=configs/teacher_kd.py --workdir=/tmp/kd \
      --config.teacher.workdir=/tmp/baseline

Born-again generations: generation 1 is trained with cross-entropy alone, each later one taught
by the one before, each in DIR/generationG; rerunning the command skips finished generations and
resumes the interrupted one:

  python -m skd_jax.main --config=configs/teacher_kd.py:quick --workdir=/tmp/ban --generations=3

Offline Fashion-MNIST (`quick`, the baseline's setup), taught by the quick baseline:

  python -m skd_jax.main --config=configs/teacher_kd.py:quick --workdir=/tmp/kd_quick \
      --config.teacher.workdir=/tmp/baseline_quick

Measured (2-core CPU, 263 s wall; baseline 277 s in the same series): top-1 91.35%, NLL 0.235, ECE
0.41, AURC 11.9 (baseline 91.56%, ECE 0.46).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick, protocol='selfkd_lib')
  config.loss.cross_entropy = dict(weight=0.1)  # 1 - alpha
  config.loss.teacher_kd = dict(weight=0.9, temperature=4.0)  # alpha
  return config
