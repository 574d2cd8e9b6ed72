r"""Training throughput (images/s) and model-FLOPs utilisation of the baseline and PS-KD steps.

Each case (model x batch size x dtype) builds the real trainer's jobs from configs/baseline.py and
configs/pskd.py (SGD, Nesterov momentum 0.9, lr 0.1, weight decay 5e-4) on synthetic data: random
uint8 images already on the devices, fed through the trainer's on-device source, by default
without augmentation (--augment adds the CIFAR random crop + flip inside the step), so the work
matches benchmarks/peers/pytorch_throughput.py. The baseline and PS-KD steps are timed in
interleaved rounds; the median round counts.

FLOPs are the model's, per device (flops.py: the convolutions and matmuls of the forward and
backward pass, counted as the peer script's torch.utils.flop_counter counts them). MFU is achieved
FLOP/s per device over the device's peak: --peak_tflops, else report.py's table for known
accelerators ("n/a" on a CPU). Prints a table and one JSON line per case and method.

  python benchmarks/throughput.py                      # everything, for an accelerator
  python benchmarks/throughput.py --models=cifar_resnet18 --batch_sizes=128 --dtypes=float32 \
      --steps=3 --rounds=3                             # a small CPU run
  python benchmarks/throughput.py --models=resnet50 --batch_sizes=256 --dtypes=bfloat16
"""

import itertools
import statistics
from unittest import mock

from absl import app
from absl import flags
import flops as flops_lib
import jax
import numpy as np
import report
import timing

from skd_jax import data as data_lib
from skd_jax import train

# Model name -> (argument of get_config, model settings over the config's, image shape, classes,
# default batch sizes). 'small_resnet' is the quick configs' network on Fashion-MNIST shapes.
MODELS = {
    'cifar_resnet18': (None, dict(name='cifar_resnet18'), (32, 32, 3), 100, (128, 512)),
    'resnet50': (None, dict(name='resnet50'), (224, 224, 3), 1000, (256,)),
    'small_resnet': ('quick', {}, (28, 28, 1), 10, (128,)),
}
METHODS = ('baseline', 'pskd')

_MODELS = flags.DEFINE_list('models', ['cifar_resnet18', 'resnet50'], f'Some of {list(MODELS)}.')
_BATCH_SIZES = flags.DEFINE_list(
    'batch_sizes', [], "Global batch sizes; empty: each model's defaults (CIFAR 128 and 512)."
)
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model.dtype values.')
_METHODS = flags.DEFINE_list(
    'methods', list(METHODS), f'Some of {METHODS}; the first is the reference.'
)
_STEPS = flags.DEFINE_integer('steps', 20, 'Steps per timed block.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median block counts.')
_EXAMPLES = flags.DEFINE_integer(
    'examples', 2048, 'Synthetic training examples (at least two batches are made).'
)
_AUGMENT = flags.DEFINE_bool(
    'augment', False, "The config's random crop and flip inside the step (4 and 2 pixels quick)."
)
_PEAK = flags.DEFINE_float(
    'peak_tflops', None, 'Peak TFLOP/s of one device for MFU; default: the built-in table.'
)


def _synthetic(shape, num_classes, num_examples):
  """A loader that returns random images and labels whatever split it is asked for."""
  rng = np.random.default_rng(0)
  dataset = data_lib.Dataset(
      rng.integers(0, 256, (num_examples, *shape), dtype=np.uint8),
      rng.integers(0, num_classes, num_examples, dtype=np.int32),
      num_classes,
  )
  return lambda data_config, split: dataset


def _config(method, arg, model, dtype, batch_size):
  config = timing.load_config(method, arg)  # Nesterov SGD, lr 0.1, weight decay 5e-4
  config.model.update(model)
  config.model.dtype = dtype
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  if not _AUGMENT.value:
    config.data.crop_padding = 0
    config.data.flip = False
  return config


def _case(model_name, batch_size, dtype):
  arg, model, shape, num_classes, _ = MODELS[model_name]
  load = _synthetic(shape, num_classes, max(_EXAMPLES.value, 2 * batch_size))
  with mock.patch.object(data_lib, 'load_split', load):
    jobs = {m: train.build_job(_config(m, arg, model, dtype, batch_size)) for m in _METHODS.value}
  times = timing.interleaved(jobs, steps=_STEPS.value, rounds=_ROUNDS.value)
  device = jax.devices()[0]
  peak = report.peak_tflops(device.device_kind, dtype, _PEAK.value)
  reference = statistics.median(times[_METHODS.value[0]])
  first = jobs[_METHODS.value[0]]  # both methods train the same network

  def logits(params, images):
    return first.networks.apply_student(params, first.state.batch_stats, images)[0]

  images = jax.ShapeDtypeStruct((batch_size, *shape), np.uint8)
  flops = flops_lib.training_flops(logits, first.state.params, images) / jax.device_count()
  rows = []
  for method in jobs:
    seconds = statistics.median(times[method])
    rows.append(
        dict(
            framework=f'jax {jax.__version__}',
            model=model_name,
            image=shape,
            batch=batch_size,
            dtype=dtype,
            method=method,
            step_s=seconds,
            img_per_s=batch_size / seconds,
            ratio=seconds / reference,
            gflop_per_step=flops / 1e9,
            tflops=flops / seconds / 1e12,
            mfu=flops / seconds / (peak * 1e12) if peak else None,
            device=f'{jax.device_count()} x {device.device_kind}',
            augment=_AUGMENT.value,
            steps=_STEPS.value,
            rounds=_ROUNDS.value,
        )
    )
  return rows


def main(argv):
  del argv
  rows = []
  for model_name, dtype in itertools.product(_MODELS.value, _DTYPES.value):
    batches = [int(b) for b in _BATCH_SIZES.value] or MODELS[model_name][-1]
    for batch_size in batches:
      rows += _case(model_name, batch_size, dtype)
  report.print_rows(f'{rows[0]["device"]}, {_ROUNDS.value} rounds x {_STEPS.value} steps', rows)


if __name__ == '__main__':
  app.run(main)
