r"""PS-KD: progressive self-knowledge distillation (Kim et al., ICCV 2021), alpha_T = 0.8.

Default: the paper's CIFAR-100 protocol (PreAct ResNet-18, 300 epochs, batch 128, SGD with Nesterov
momentum, lr 0.1 / 10 at epochs 150 and 225, weight decay 5e-4). Needs CIFAR-100 through TFDS
(internet on first use).

  python -m skd_jax.main --config=configs/pskd.py --workdir=/tmp/pskd

Expected (official PS-KD README, best epoch): top-1 error 20.82%, i.e. top-1 ~79.2%, top-5 error
5.10, NLL 0.76, ECE 1.77, AURC 52.10.

Offline Fashion-MNIST (`quick`: small ResNet, 8 epochs, under 5 minutes on a 2-core CPU):

  python -m skd_jax.main --config=configs/pskd.py:quick --workdir=/tmp/pskd_quick

Measured (2-core CPU, 240 s wall; baseline 233 s): top-1 90.73%, NLL 0.270, ECE 3.82, AURC 14.0
(baseline 91.35%). With only 8 epochs alpha_t reaches 0.8 while the model is still learning;
PS-KD's gains need the long schedule.

The history of past predictions is kept in float32 by default; `loss.pskd.storage='bfloat16'`
halves it and `'top_k'` keeps each example's `loss.pskd.top_k` largest probabilities (ImageNet-1k
top-5: ~26 MB instead of 5.1 GB; `python benchmarks/history_memory.py`):

  python -m skd_jax.main --config=configs/pskd.py:quick --workdir=/tmp/pskd_top3 \
      --config.loss.pskd.storage=top_k --config.loss.pskd.top_k=3
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False)
  config = config_lib.base_config(arg.quick)
  config.loss.pskd = dict(weight=1.0, alpha_T=0.8, storage='float32', top_k=5)
  return config
