"""The model-FLOPs count of benchmarks/flops.py against closed forms and torch's count."""

import jax
import jax.numpy as jnp
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
