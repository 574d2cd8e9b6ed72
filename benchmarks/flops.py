"""Model FLOPs of a training step, counted on the traced program, the same on every backend.

The count is torch.utils.flop_counter's convention (convolutions and matmuls, every kernel tap,
forward and backward), so benchmarks/throughput.py and peers/pytorch_throughput.py report the same
FLOPs for the same model: 426.1 GFLOP per CIFAR ResNet-18 step of 128 in both. XLA's own count of
a compiled step can't serve: it skips the taps that fall on padding, and on a GPU it leaves out
the convolutions altogether (they run as cuDNN calls).
"""

import math

import jax
from jax.extend import core as jex
import jax.numpy as jnp


def dense_flops(jaxpr) -> int:
  """FLOPs of the convolutions and matmuls in ``jaxpr`` and its sub-jaxprs, every tap counted.

  A dot_general costs 2 x (output elements) x (contracted size); a convolution 2 x (output
  elements) x (kernel taps x input features per group). The transposed convolution that carries a
  strided convolution's gradient to its input dilates that gradient with zeros (lhs_dilation);
  those products are not counted, so each gradient convolution costs what its forward one does.
  """
  total = 0
  for eqn in jaxpr.eqns:
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    elif eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      taps = math.prod(rhs[d] for d in eqn.params['dimension_numbers'].rhs_spec[1:])
      zeros = math.prod(eqn.params['lhs_dilation']) * eqn.params['batch_group_count']
      total += 2 * math.prod(out) * taps // zeros
  return total + sum(dense_flops(sub) for sub in jex.subjaxprs(jaxpr))


def training_flops(logits_fn, params, images) -> int:
  """Dense FLOPs of ``logits_fn(params, images)`` and of its gradient with respect to ``params``.

  ``params`` and ``images`` may be ``jax.ShapeDtypeStruct``s: the function is traced, not run.
  """
  grad = jax.grad(lambda params, images: jnp.sum(logits_fn(params, images)))
  return dense_flops(jax.make_jaxpr(grad)(params, images).jaxpr)
