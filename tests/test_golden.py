"""DLB's loss, the EMA update, TF-KD (reg), Zipf's LS, BAKE and BYOT against PyTorch code.

``golden/dlb_ema.npz`` was written by ``golden/make_dlb_ema.py``, ``golden/tfkd_reg.npz`` by
``golden/make_tfkd_reg.py``, ``golden/zipf_ls.npz`` by ``golden/make_zipf_ls.py``,
``golden/bake.npz`` by ``golden/make_bake.py``, ``golden/byot.npz`` by ``golden/make_byot.py``
(Self-KD-Lib's BYOT: there is no official code) (their docstrings name the repositories, commits
and lines they execute). These tests read the arrays only: no PyTorch.
"""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import export
from skd_jax import losses
from skd_jax import networks as networks_lib
from skd_jax import terms as terms_lib
from skd_jax.terms import zipf_ls

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'dlb_ema.npz'


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as data:
    return dict(data)


def _our_dlb_losses(golden, config_name, run='dlb'):
  """Our batch losses for the official run's steps, with the loss terms of ``configs/<name>``.

  The batch loss is the trainer's: the mean over the current batch's real examples.
  """
  loss_config = importlib.import_module(f'configs.{config_name}').get_config().loss
  assert loss_config.dlb.temperature == golden['dlb_temperature']
  assert loss_config.dlb.alpha == golden['dlb_alpha']
  steps, batch, classes = golden[f'{run}_logits'].shape
  method = terms_lib.build(loss_config, terms_lib.Context(classes, 200, batch))
  carry, got = method.init_carry(), []
  for step in range(steps):
    labels = jnp.asarray(golden[f'{run}_labels'][step])
    valid = jnp.asarray(golden[f'{run}_valid'][step])
    previous = terms_lib.Pass(
        jnp.asarray(golden[f'{run}_previous_logits'][step]),
        jnp.asarray(golden[f'{run}_previous_labels'][step]),
        jnp.asarray(golden[f'{run}_previous_valid'][step]),  # as the source: none at step 0
    )
    inputs = terms_lib.TermInputs(
        jnp.asarray(golden[f'{run}_logits'][step]),
        labels,
        valid=valid,
        passes={'previous': previous},
    )
    # PS-KD's rows for epoch 0: the labels (its target is one-hot before any history exists).
    out = method(inputs, method.init_rows(labels), carry)
    carry = out.carry
    got.append(float(jnp.sum(jnp.where(valid, out.loss, 0.0)) / jnp.sum(valid)))
  return np.array(got)


def test_dlb_losses_are_the_official_ones_from_the_first_step_on(golden):
  # Step 0 has no previous batch: the official loss is the plain cross-entropy, weight 1.
  np.testing.assert_allclose(
      _our_dlb_losses(golden, 'dlb'), golden['dlb_loss'], rtol=1e-5, atol=1e-5
  )


def test_pskd_dlb_with_the_epoch_0_target_gives_the_official_dlb_losses(golden):
  np.testing.assert_allclose(
      _our_dlb_losses(golden, 'pskd_dlb'), golden['dlb_loss'], rtol=1e-5, atol=1e-5
  )


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), -1, keepdims=True))


def _weighted_dlb(golden, step, ce_previous, kl, ce_current):
  """The sum of the short run's per-example CE and KL at ``step``, weighted per slot (numpy)."""
  run = lambda key: golden[f'dlb_short_{key}'][step]
  ce = lambda z, y: -np.take_along_axis(_log_softmax(z), y[:, None], -1)[:, 0]
  t = float(golden['dlb_temperature'])
  teacher = _log_softmax(golden['dlb_short_logits'][step - 1] / t)
  student = _log_softmax(run('previous_logits') / t)
  kl_values = t * t * np.sum(np.exp(teacher) * (teacher - student), -1)
  return np.sum(
      ce_previous * ce(run('previous_logits'), run('previous_labels'))
      + kl * kl_values
      + ce_current * ce(run('logits'), run('labels'))
  )


def test_dlb_weights_around_a_short_batch_are_the_documented_ones(golden):
  """docs/methods.md: slot i of the previous batch is weighted like main slot i; the reference
  weights CE by 1 / (p + c) over both batches and the KL by alpha / p over the previous one."""
  ours, official = _our_dlb_losses(golden, 'dlb', run='dlb_short'), golden['dlb_short_loss']
  alpha = float(golden['dlb_alpha'])
  for step in range(1, len(official)):
    u = golden['dlb_short_previous_valid'][step].astype(np.float64)
    v = golden['dlb_short_valid'][step].astype(np.float64)
    p, c = u.sum(), v.sum()
    np.testing.assert_allclose(
        official[step],
        _weighted_dlb(golden, step, u / (p + c), alpha * u / p, v / (p + c)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        ours[step],
        _weighted_dlb(golden, step, u * v / (2 * c), alpha * u * v / c, v / (2 * c)),
        rtol=1e-5,
    )
    # Equal exactly when both batches are full; the short batch and the step after it differ.
    assert np.isclose(ours[step], official[step], rtol=1e-5) == (p == c == len(u))


def test_the_ema_updates_are_the_official_ones(golden):
  spec = export.ModelSpec('small_resnet', {}, 5, (8, 8, 1), (0.5,), (0.25,))
  networks = networks_lib.Networks(spec, {}, ema_max_decay=float(golden['ema_max_decay']))
  ema = {
      'params': {'kernel': golden['ema_initial_kernel'], 'bias': golden['ema_initial_bias']},
      'batch_stats': {},
  }
  for update in range(len(golden['ema_kernel'])):
    params = {
        'backbone': {
            'kernel': golden['ema_student_kernel'][update],
            'bias': golden['ema_student_bias'][update],
        }
    }
    ema = networks.update_ema(ema, params, {'backbone': {}}, jnp.int32(update))
    np.testing.assert_allclose(
        ema['params']['kernel'], golden['ema_kernel'][update], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        ema['params']['bias'], golden['ema_bias'][update], rtol=1e-5, atol=1e-6
    )
  # The cap is reached within the recorded updates (decays 1/2, 2/3, then the maximum).
  assert 1 - 1 / (len(golden['ema_kernel']) + 1) > golden['ema_max_decay']


# USKD against the official loss: golden/uskd.npz was written by golden/make_uskd.py (its
# docstring names the repository, commit and file it executes).

USKD_GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'uskd.npz'


@pytest.fixture(scope='module')
def uskd_golden():
  with np.load(USKD_GOLDEN) as data:
    return dict(data)


def _our_uskd(golden, group_size):
  """The batch loss of ``configs/uskd.py``'s term and its gradients, as the official run's."""
  settings = importlib.import_module('configs.uskd').get_config().loss.uskd
  for key in ('alpha', 'beta', 'mu'):
    assert settings[key] == golden[key]
  settings.group_size = group_size
  batch, classes = golden['logits'].shape
  term = terms_lib.from_settings(
      importlib.import_module('skd_jax.terms.uskd').USKD,
      settings,
      terms_lib.Context(classes, 200, batch, num_stages=4),
  )
  labels = jnp.asarray(golden['labels'], jnp.int32)

  def batch_loss(logits, features, kernel, bias):
    weak = features @ kernel.T + bias  # the official fc, PyTorch's [out, in] kernel
    inputs = terms_lib.TermInputs(logits, labels, outputs={'uskd': weak})
    return jnp.mean(term(inputs).loss)

  args = [jnp.asarray(golden[k], jnp.float32) for k in ('logits', 'features', 'kernel', 'bias')]
  loss, grads = jax.value_and_grad(batch_loss, argnums=(0, 1, 2, 3))(*args)
  return [loss, *grads]


@pytest.mark.parametrize('run, group_size', [('whole', 0), ('grouped', 4)])
def test_uskd_loss_and_gradients_are_the_official_ones(uskd_golden, run, group_size):
  """One call on 8 examples, and (``grouped``) the mean of the official loss over two halves:
  what DistributedDataParallel trains on two GPUs, and ``group_size=4`` here on one batch."""
  names = ('loss', 'grad_logits', 'grad_features', 'grad_kernel', 'grad_bias')
  for name, ours in zip(names, _our_uskd(uskd_golden, group_size)):
    official = uskd_golden[f'{run}_{name}']  # float64
    # rtol 1e-5; the atol covers float32 cancellation in entries ~1e3 times smaller than the
    # largest (worst seen: relative 1.1e-5 on a kernel gradient of 1e-5 beside ones of 2e-2).
    atol = 1e-6 * np.abs(official).max()
    np.testing.assert_allclose(ours, official, rtol=1e-5, atol=atol, err_msg=name)


def test_uskd_golden_groups_matter(uskd_golden):
  # The halves' batch means differ from the whole batch's, so the grouped run tests grouping.
  assert not np.allclose(uskd_golden['whole_grad_logits'], uskd_golden['grouped_grad_logits'])


# --- TF-KD (reg) ---------------------------------------------------------------------------------

TFKD_REG = pathlib.Path(__file__).parent / 'golden' / 'tfkd_reg.npz'


def _batch_loss_and_grad(loss_config, logits, labels):
  """The trainer's batch loss (mean over the batch of the weighted terms) and its gradient."""
  batch, classes = logits.shape
  method = terms_lib.build(loss_config, terms_lib.Context(classes, 200, batch))
  loss = lambda z: jnp.mean(method(terms_lib.TermInputs(z, labels)).loss)
  return jax.value_and_grad(loss)(jnp.asarray(logits))


@pytest.mark.parametrize('case', ['r18', 'mnv2'])
def test_tfkd_reg_is_the_official_loss_with_weights_one_minus_alpha_and_alpha_m_over_c(case):
  """golden/make_tfkd_reg.py ran the official ``loss_kd_regularization``; its ``KLDivLoss()``
  mean over B x C is our per-example KL with weight alpha m / C, averaged over the batch."""
  with np.load(TFKD_REG) as data:
    g = {k.removeprefix(f'{case}_'): data[k] for k in data if k.startswith(f'{case}_')}
    correct_prob = float(data['correct_prob'])
  alpha, classes = float(g['alpha']), g['logits'].shape[1]
  if case == 'r18':  # the shipped config is the official ResNet-18 CIFAR-100 setting
    loss_config = importlib.import_module('configs.tfkd_reg').get_config().loss
  else:
    loss_config = ml_collections.ConfigDict(
        {
            'cross_entropy': {'weight': 1.0 - alpha},
            'tfkd_reg': {
                'weight': alpha * float(g['multiplier']) / classes,
                'temperature': float(g['temperature']),
                'correct_prob': correct_prob,
            },
        }
    )
  assert loss_config.tfkd_reg.temperature == g['temperature']
  assert loss_config.tfkd_reg.correct_prob == correct_prob
  loss, grad = _batch_loss_and_grad(loss_config, g['logits'], jnp.asarray(g['labels']))
  np.testing.assert_allclose(float(loss), g['loss'], rtol=1e-5)
  np.testing.assert_allclose(grad, g['grad'], rtol=1e-5, atol=1e-5 * np.abs(g['grad']).max())


# --- Zipf's label smoothing ----------------------------------------------------------------------

ZIPF_LS = pathlib.Path(__file__).parent / 'golden' / 'zipf_ls.npz'


@pytest.mark.parametrize('case', ['cifar', 'plain'])
def test_zipf_ls_votes_loss_and_gradient_are_the_official_ones(case):
  """golden/make_zipf_ls.py ran the official dense predictions (``get_dense_info``),
  ``zipf_loss`` and the training loss ``CE + lambda zipf_loss``; ours: the cross_entropy and
  zipf_ls terms, averaged over the batch."""
  with np.load(ZIPF_LS) as data:
    g = {k.removeprefix(f'{case}_'): data[k] for k in data if k.startswith(f'{case}_')}
  if case == 'cifar':  # the shipped config is the official CIFAR-100 setting
    loss_config = importlib.import_module('configs.zipf_ls').get_config().loss
  else:
    loss_config = ml_collections.ConfigDict(
        {
            'cross_entropy': {'weight': 1.0},
            'zipf_ls': {
                'weight': float(g['lambda']),
                'upsample': str(g['upsample']),
                'power': float(g['power']),
            },
        }
    )
  assert loss_config.zipf_ls.weight == g['lambda']
  assert loss_config.zipf_ls.upsample == str(g['upsample'])
  assert loss_config.zipf_ls.power == g['power']
  weight, bias = jnp.asarray(g['weight']), jnp.asarray(g['bias'])
  classify = lambda h: h @ weight.T + bias
  feature_map = jnp.asarray(g['feature_map'])
  classes = weight.shape[0]

  # The votes: every location's argmax of the classifier, after the same upsampling.
  dense = zipf_ls.dense_logits(feature_map, classify, str(g['upsample']))
  np.testing.assert_array_equal(jnp.argmax(dense, -1), g['dense_argmax'])
  np.testing.assert_allclose(classify(feature_map.mean((1, 2))), g['logits'], rtol=1e-5, atol=1e-5)

  labels = jnp.asarray(g['labels'])
  method = terms_lib.build(loss_config, terms_lib.Context(classes, 200, len(labels)))

  def batch_loss(z):
    inputs = terms_lib.TermInputs(
        z, labels, outputs={'feature_map': feature_map}, classify=classify
    )
    out = method(inputs)
    return jnp.mean(out.loss), jnp.mean(out.losses['zipf_ls'])

  (loss, zipf), grad = jax.value_and_grad(batch_loss, has_aux=True)(jnp.asarray(g['logits']))
  np.testing.assert_allclose(float(zipf), g['zipf_loss'], rtol=1e-5)
  np.testing.assert_allclose(float(loss), g['loss'], rtol=1e-5)
  np.testing.assert_allclose(grad, g['grad'], rtol=1e-5, atol=1e-5 * np.abs(g['grad']).max())


# --- BAKE -----------------------------------------------------------------------------------------

BAKE = pathlib.Path(__file__).parent / 'golden' / 'bake.npz'


@pytest.mark.parametrize('case', ['cifar', 'tiny'])
def test_bake_targets_loss_and_gradient_are_the_official_ones(case):
  """golden/make_bake.py ran the official ``knowledge_ensemble`` and ``KDLoss`` (small-scale and
  ImageNet versions, which agree) and the training loss ``CE + lamda KD``; ours: the
  cross_entropy and bake terms, averaged over the batch."""
  with np.load(BAKE) as data:
    g = {k.removeprefix(f'{case}_'): data[k] for k in data if k.startswith(f'{case}_')}
  if case == 'cifar':  # the shipped config is the official CIFAR-100 setting
    loss_config = importlib.import_module('configs.bake').get_config().loss
  else:
    loss_config = ml_collections.ConfigDict(
        {
            'cross_entropy': {'weight': 1.0},
            'bake': {
                'weight': float(g['lamda']),
                'temperature': float(g['temperature']),
                'omega': float(g['omega']),
            },
        }
    )
  assert loss_config.bake.weight == g['lamda']
  assert loss_config.bake.temperature == g['temperature']
  assert loss_config.bake.omega == g['omega']
  logits, features = jnp.asarray(g['logits']), jnp.asarray(g['features'])
  labels = jnp.asarray(g['labels'])
  bake = dict(temperature=float(g['temperature']), omega=float(g['omega']))
  targets = losses.bake_targets(logits, features, **bake)
  np.testing.assert_allclose(targets, g['targets'], rtol=1e-5, atol=1e-7)
  method = terms_lib.build(loss_config, terms_lib.Context(logits.shape[1], 200, len(labels)))

  def batch_loss(z):
    out = method(terms_lib.TermInputs(z, labels, outputs={'features': features}))
    return jnp.mean(out.loss), jnp.mean(out.losses['bake'])

  (loss, kd), grad = jax.value_and_grad(batch_loss, has_aux=True)(logits)
  np.testing.assert_allclose(float(kd), g['kd_loss'], rtol=1e-5)
  np.testing.assert_allclose(float(loss), g['loss'], rtol=1e-5)
  np.testing.assert_allclose(grad, g['grad'], rtol=1e-5, atol=1e-5 * np.abs(g['grad']).max())


# --- BYOT (Self-KD-Lib's; there is no official code) ---------------------------------------------

BYOT = pathlib.Path(__file__).parent / 'golden' / 'byot.npz'


def test_byot_with_the_shipped_config_is_self_kd_libs_loss_and_gradients():
  """golden/make_byot.py ran Self-KD-Lib's ``BYOT`` (CE of every head + T^2 KL at T = 4 from the
  detached final logits + 0.05 * mean squared feature distance): our ``cross_entropy`` (weight 1)
  plus ``byot`` (weight 2, alpha 0.5, feature weight 0.025, 'mean') averaged over the batch.
  Self-KD-Lib's head on stage 3 is its ``x1`` / ``f1``, on stage 2 ``x2`` / ``f2``."""
  with np.load(BYOT) as data:
    g = {k: data[k] for k in data}
  loss_config = importlib.import_module('configs.byot').get_config().loss
  assert loss_config.byot.temperature == g['temperature']
  labels = jnp.asarray(g['labels'])
  method = terms_lib.build(
      loss_config, terms_lib.Context(g['z0'].shape[1], 200, len(labels), num_stages=4)
  )
  names = ('z0', 'z1', 'z2', 'f0', 'f1', 'f2')

  def batch_loss(z0, z1, z2, f0, f1, f2):
    outputs = {'features': f0, 'byot3': z1, 'byot3/features': f1, 'byot2': z2, 'byot2/features': f2}
    return jnp.mean(method(terms_lib.TermInputs(z0, labels, outputs)).loss)

  args = [jnp.asarray(g[k], jnp.float32) for k in names]
  loss, grads = jax.value_and_grad(batch_loss, argnums=tuple(range(6)))(*args)
  np.testing.assert_allclose(float(loss), g['loss'], rtol=1e-5)
  for name, grad in zip(names, grads):
    want = g[f'g_{name}']
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=name)
