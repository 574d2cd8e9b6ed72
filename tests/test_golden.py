"""DLB's loss and the EMA update against values from running the official PyTorch code.

``golden/dlb_ema.npz`` was written by ``golden/make_dlb_ema.py`` (its docstring names the
repositories, commits and lines it executes). These tests read the arrays only: no PyTorch.
"""

import importlib
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from skd_jax import export
from skd_jax import networks as networks_lib
from skd_jax import terms as terms_lib

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'dlb_ema.npz'


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as data:
    return dict(data)


def _official_dlb_losses(golden, config_name):
  """Our batch losses for the official run's steps, with the loss terms of ``configs/<name>``."""
  loss_config = importlib.import_module(f'configs.{config_name}').get_config().loss
  assert loss_config.dlb.temperature == golden['dlb_temperature']
  assert loss_config.dlb.alpha == golden['dlb_alpha']
  steps, batch, classes = golden['dlb_logits'].shape
  method = terms_lib.build(loss_config, terms_lib.Context(classes, 200, batch))
  carry, got = method.init_carry(), []
  for step in range(steps):
    labels = jnp.asarray(golden['dlb_labels'][step])
    previous = terms_lib.Pass(
        jnp.asarray(golden['dlb_previous_logits'][step]),
        jnp.asarray(golden['dlb_previous_labels'][step]),
        jnp.full(batch, step > 0),  # what the source gives: no previous batch at step 0
    )
    inputs = terms_lib.TermInputs(
        jnp.asarray(golden['dlb_logits'][step]), labels, passes={'previous': previous}
    )
    # PS-KD's rows for epoch 0: the labels (its target is one-hot before any history exists).
    out = method(inputs, method.init_rows(labels), carry)
    carry = out.carry
    got.append(float(jnp.mean(out.loss)))
  return np.array(got)


def test_dlb_losses_are_the_official_ones_from_the_first_step_on(golden):
  # Step 0 has no previous batch: the official loss is the plain cross-entropy, weight 1.
  np.testing.assert_allclose(
      _official_dlb_losses(golden, 'dlb'), golden['dlb_loss'], rtol=1e-5, atol=1e-5
  )


def test_pskd_dlb_with_the_epoch_0_target_gives_the_official_dlb_losses(golden):
  np.testing.assert_allclose(
      _official_dlb_losses(golden, 'pskd_dlb'), golden['dlb_loss'], rtol=1e-5, atol=1e-5
  )


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
