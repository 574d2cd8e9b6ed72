"""The variable owner: heads, the student's classifier, the EMA copy and the forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import export
from skd_jax import networks as networks_lib
from skd_jax import terms as terms_lib
from skd_jax.data import sources

SPEC = export.ModelSpec(
    'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (8, 8, 1), (0.5,), (0.25,)
)
B = 4


@pytest.fixture(scope='module')
def student():
  networks = networks_lib.Networks(SPEC, {}, ema_max_decay=0.9)
  return networks, networks.init(jax.random.key(0))


def _images(key, n=B):
  return jax.random.randint(jax.random.key(key), (n, 8, 8, 1), 0, 256).astype(jnp.uint8)


def _examples(key):
  return sources.Examples(jnp.arange(B), jnp.ones(B, bool), jnp.arange(B) % 5, _images(key))


def test_classify_is_the_backbones_own_final_layer(student):
  networks, variables = student
  logits, outputs, _ = networks.apply_student(
      variables['params'], variables['batch_stats'], _images(0)
  )
  np.testing.assert_allclose(
      networks.classify(variables['params'], outputs['features']), logits, rtol=1e-5, atol=1e-6
  )


def test_the_ema_follows_min_of_1_minus_1_over_t_plus_2_and_the_maximum(student):
  networks, variables = student
  params, stats = variables['params'], variables['batch_stats']
  ema = networks.init_ema(params, stats)
  moved = jax.tree.map(lambda x: x + 1.0, params)
  # Update 0 averages (d = 1/2), update 1 keeps 2/3, later ones cap at 0.9.
  first = networks.update_ema(ema, moved, stats, jnp.int32(0))
  second = networks.update_ema(first, params, stats, jnp.int32(1))
  late = networks.update_ema(first, params, stats, jnp.int32(100))
  for got, offset in ((first, 0.5), (second, 0.5 * 2 / 3), (late, 0.5 * 0.9)):
    jax.tree.map(
        lambda e, p, offset=offset: np.testing.assert_allclose(e, p + offset, rtol=1e-5, atol=1e-6),
        got['params'],
        params['backbone'],
    )
  assert networks_lib.Networks(SPEC, {}).init_ema(params, stats) == {}


def test_separate_and_joint_student_passes_differ_only_in_batchnorm_statistics(student):
  networks, variables = student
  params, stats = variables['params'], variables['batch_stats']
  views = _images(1)
  batch = {'main': _examples(1), 'partner': _examples(2)}
  separate = terms_lib.Forward('p', group='partner', grad=False, batchnorm='separate')
  joint = terms_lib.Forward('p', group='partner', grad=False, batchnorm='joint')
  main_s, _, passes_s, stats_s = networks.forward(params, stats, views, batch, (separate,))
  main_j, _, passes_j, _ = networks.forward(params, stats, views, batch, (joint,))
  alone, _, after_main = networks.apply_student(params, stats, views)
  np.testing.assert_allclose(main_s, alone, rtol=1e-6)  # separate: the main call is unchanged
  partner_alone, _, after_both = networks.apply_student(params, after_main, _images(2))
  np.testing.assert_allclose(passes_s['p'].logits, partner_alone, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, stats_s, after_both)  # running stats see both
  both, _, _ = networks.apply_student(params, stats, jnp.concatenate([views, _images(2)]))
  np.testing.assert_allclose(main_j, both[:B], rtol=1e-5, atol=1e-6)  # joint: one call
  np.testing.assert_allclose(passes_j['p'].logits, both[B:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(main_j, main_s)


def test_a_pass_without_gradient_passes_none(student):
  networks, variables = student
  batch = {'main': _examples(3), 'partner': _examples(4)}

  def partner_sum(params, grad):
    forward = terms_lib.Forward('p', group='partner', grad=grad)
    _, _, passes, _ = networks.forward(
        params, variables['batch_stats'], _images(3), batch, (forward,)
    )
    return passes['p'].logits.sum()

  without = jax.grad(partner_sum)(variables['params'], False)
  with_grad = jax.grad(partner_sum)(variables['params'], True)
  assert all(not np.any(g) for g in jax.tree.leaves(without))
  assert any(np.any(g) for g in jax.tree.leaves(with_grad))


def test_ema_passes_run_the_copy_in_evaluation_mode(student):
  networks, variables = student
  ema = networks.init_ema(variables['params'], variables['batch_stats'])
  ema = jax.tree.map(lambda x: x * 0.5, ema)
  batch = {'main': _examples(5)}
  _, _, passes, _ = networks.forward(
      variables['params'],
      variables['batch_stats'],
      _images(5),
      batch,
      (terms_lib.Forward('ema', network='ema'),),
      ema=ema,
  )
  expected, _ = networks.apply_inference(ema, _images(5))
  np.testing.assert_array_equal(passes['ema'].logits, expected)
