"""The model-FLOPs count of benchmarks/flops.py against closed forms and torch's count."""

import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import flops
from skd_jax import models


def _flops(f, *args):
  return flops.dense_flops(jax.make_jaxpr(f)(*args).jaxpr)


def test_a_dense_layer_costs_two_flops_per_product_forward_and_for_its_weight_gradient():
  x, w = jnp.ones((4, 3)), jnp.ones((3, 5))
  assert _flops(lambda w: x @ w, w) == 2 * 4 * 3 * 5
  assert _flops(jax.grad(lambda w: jnp.sum(x @ w)), w) == 2 * (2 * 4 * 3 * 5)


@pytest.mark.parametrize('stride', [1, 2])
def test_each_gradient_of_a_convolution_costs_what_its_forward_pass_does(stride):
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))  # NHWC, HWIO; SAME padding

  def conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )

  out = 8 // stride
  forward = 2 * (2 * out * out * 5) * (3 * 3 * 3)  # every tap, padding included
  assert _flops(conv, x, k) == forward
  assert _flops(jax.grad(lambda k: jnp.sum(conv(x, k))), k) == 2 * forward  # + weight gradient
  both = jax.grad(lambda x, k: jnp.sum(conv(x, k)), argnums=(0, 1))
  assert _flops(both, x, k) == 3 * forward  # + input gradient, zeros of the dilation not counted


def test_flops_inside_nested_jits_are_counted():
  x = jnp.ones((4, 3))
  assert _flops(jax.jit(lambda w: jax.jit(lambda v: x @ v)(w)), jnp.ones((3, 5))) == 120


@pytest.mark.parametrize(
    'name, batch, shape, classes, torch_flops',
    [
        # torch.utils.flop_counter's counts (torch 2.11) for the peer script's models, one step
        ('cifar_resnet18', 128, (32, 32, 3), 100, 426_147_053_568),
        ('resnet50', 8, (224, 224, 3), 1000, 6_220_563_873_792 // 32),  # 256 images / 32
    ],
)
def test_a_training_step_counts_what_torchs_flop_counter_counts(
    name, batch, shape, classes, torch_flops
):
  module = models.get_model(name, num_classes=classes)
  variables = module.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)

  def logits(params, images):
    variables_now = {'params': params, 'batch_stats': variables['batch_stats']}
    (logits, _), _ = module.apply(variables_now, images, train=True, mutable=['batch_stats'])
    return logits

  images = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
  assert flops.training_flops(logits, variables['params'], images) == torch_flops


def test_the_startup_benchmark_writes_its_data_subset_and_applies_its_overrides(tmp_path):
  """benchmarks/startup.py's parts that need no process: the subset and each run's config."""
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))  # its `timing`
  from benchmarks import startup  # pylint: disable=g-import-not-at-top
  from skd_jax.data import idx  # pylint: disable=g-import-not-at-top

  flags.FLAGS(['startup', '--train_examples=30', '--test_examples=20'])
  startup._write_subset(str(tmp_path))  # pylint: disable=protected-access
  images, labels = idx.load_fashion_mnist(str(tmp_path), 'train')
  full_images, full_labels = idx.load_fashion_mnist(idx.FASHION_MNIST_DIR, 'train')
  np.testing.assert_array_equal(images, full_images[:30])
  np.testing.assert_array_equal(labels, full_labels[:30])
  assert len(idx.load_fashion_mnist(str(tmp_path), 'test')[1]) == 20
  args = dict(
      config='pskd',
      data=str(tmp_path),
      seed=7,
      num_epochs=1,
      overrides=['batch_size=16', 'model.widths=(4, 8, 8)', 'model.dtype=bfloat16'],
  )
  config = startup._config(args)  # pylint: disable=protected-access
  assert (config.seed, config.num_epochs, config.batch_size) == (7, 1, 16)
  assert tuple(config.model.widths) == (4, 8, 8) and config.model.dtype == 'bfloat16'
  assert config.data.dir == str(tmp_path) and 'pskd' in config.loss


def test_the_input_benchmark_times_every_path_on_the_same_crops_of_photo_like_jpegs():
  """benchmarks/input_throughput.py in a tiny mode: two sizes, batches of 2, one round."""
  from benchmarks import input_throughput  # pylint: disable=g-import-not-at-top
  from skd_jax.data import resized_crops  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  files = {'64x48': [input_throughput.synthetic_jpeg(rng, 48, 64) for _ in range(3)]}
  files['96x128'] = [input_throughput.synthetic_jpeg(rng, 128, 96) for _ in range(3)]
  big = input_throughput.synthetic_jpeg(rng, 375, 500)
  assert 0.4 < len(big) / (500 * 375) < 0.8  # ImageNet's JPEGs: ~0.59 bytes per pixel
  kwargs = dict(batch_size=2, steps=1, image_size=16, eval_resize=20, workers=0)
  paths = input_throughput.paths()
  assert paths == input_throughput.PATHS[: 3 if resized_crops.simplejpeg is not None else 2]
  times = input_throughput.interleaved(input_throughput.make_jobs(files, **kwargs), rounds=1)
  rows = input_throughput.summary(times, images_per_block=2)
  assert [(row.case, row.size, row.path) for row in rows] == [
      (case, size, path) for size in files for case in ('train', 'eval') for path in paths
  ]
  for row in rows:
    assert row.images_per_s > 0 and row.cpu_ms > 0 and row.ratio > 0 and row.cpu_ratio > 0
    assert row.path != 'before' or row.ratio == row.cpu_ratio == 1
  # Each job ran with its codec and left the environment as it was.
  assert resized_crops.CODEC_ENV not in os.environ
  # The paths time the same work: a step's crops are the same boxes, within a few levels.
  batches = []
  for path in paths:
    records = input_throughput.Records(files['96x128'], decode=path == 'before')
    reader = input_throughput._step_reader(records, 2, 16)  # pylint: disable=protected-access
    job = input_throughput._with_codec(path, lambda: reader(1))  # pylint: disable=protected-access
    batches.append(job()['main']['images'].astype(np.int64))
  assert all(b.shape == (2, 16, 16, 3) for b in batches)
  for batch in batches[1:]:
    assert np.abs(batches[0] - batch).mean() <= 3
