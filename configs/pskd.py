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

ImageNet (`imagenet`: the paper's ResNet-152 protocol; `imagenet_resnet50`: the same with
ResNet-50), streamed from the host with random-resized 224-pixel crops and flips, evaluated on
the 256-resized centre 224 crop of the validation split, bfloat16 computation:

  python -m skd_jax.main --config=configs/pskd.py:imagenet --workdir=/tmp/pskd_imagenet

TFDS `imagenet2012` needs a manual download: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from image-net.org into DIR/downloads/manual, run
`pip install tensorflow && tfds build imagenet2012 --file_format=array_record --data_dir=DIR
--manual_dir=DIR/downloads/manual` once, and add --config.data.dir=DIR.

Settings: 90 epochs, global batch 256, SGD with Nesterov momentum 0.9, lr 0.1 / 10 at epochs 30
and 60, weight decay 1e-4, alpha_T = 0.8, torchvision's ResNet-152. Verified in the official code
(lgcnsai/PS-KD-Pytorch): Nesterov SGD with momentum 0.9, alpha_T 0.8, the ResNet-152 for
`imagenet`, RandomResizedCrop(224) + flip for training and Resize(256) + CenterCrop(224) for
evaluation, mean/std normalisation. Not verified there (its defaults are CIFAR's, its README shows
only a CIFAR command; taken from the paper's text as we read it): the epochs, the milestones, the
batch size and the weight decay. Differences: the official ImageNet training transform also
applies colour jitter (0.4) and PCA lighting noise (0.1), which skd_jax does not; the input is
normalised with the statistics of 1,000 training images rather than the usual fixed ImageNet
values; BatchNorm uses global-batch statistics. Expected (official README, ResNet-152 + PS-KD):
top-1 error 21.51%, top-5 error 5.86, NLL 0.84, ECE 1.85, AURC 60.61 (the paper's table:
21.41 / 5.86 / 0.84 / 2.51 / 61.01).
"""

from skd_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, quick=False, imagenet=False, imagenet_resnet50=False)
  config = config_lib.base_config(arg.quick)
  config.loss.pskd = dict(weight=1.0, alpha_T=0.8, storage='float32', top_k=5)
  if arg.imagenet or arg.imagenet_resnet50:
    config_lib.imagenet_protocol(config, 'resnet50' if arg.imagenet_resnet50 else 'resnet152')
  return config
