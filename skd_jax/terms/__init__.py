"""Composable loss terms: the unit a method is built from.

A method is a weighted sum of terms, named in the config::

  config.loss.pskd = dict(weight=1.0, alpha_T=0.8)

The trainer imports ``skd_jax.terms.<name>`` and makes the :class:`LossTerm` dataclass it defines
from ``config.loss.<name>`` (:func:`build`), so a new method is a new module here plus a config
file; the trainer does not change. A term's settings are declared once, on its fields (the type is
the annotation's, the range or choices :func:`setting`'s)::

  alpha_T: float = terms.setting(0.8, low=0, high=1)
  storage: str = terms.setting('float32', choices=('float32', 'bfloat16', 'top_k'))

Fields named like :class:`Context` fields (``num_classes``, ``num_stages``, ...) are filled from
the run; ``weight`` is a non-negative number; a config that omits a setting gets its default,
which ``--help`` shows (:func:`settings`). Every setting is checked against its declaration in one
place, and what depends on the run in the term's :meth:`LossTerm.check`. A term from outside this
package is named by import path, ``config.loss.NAME = dict(module='mylab.term', weight=...)``
(``skd_jax.plugins``): a module with one such dataclass. A module here or outside may instead
provide ``make(settings, context)`` returning the term, which then checks its settings itself
(:func:`check_range`, :func:`check_choice`). Modules here whose names start with ``_`` are not
terms: ``_protocol`` (what a term is given and returns), ``_combined`` (:class:`Combined`) and
``_settings`` (:func:`setting`, :func:`build` and the settings checks).

A term is pure: it maps :class:`TermInputs` (what the step's forward passes produced) plus its
own state to per-example losses and its next state. It declares what it needs beyond the final
logits of the main examples, and the trainer provides it without knowing the method:

* named intermediates of the backbone (``inputs.outputs['stage2']``, ``'features'``), always there;
* training-only auxiliary heads (:meth:`LossTerm.heads`): :class:`HeadRequest` s that
  ``skd_jax.networks`` builds (terms construct no Flax modules) through the registry of head kinds
  (``skd_jax.models.register_head``; a plug-in module may register its own). A head reads one
  stage or several (``HeadRequest.stages``); its logits appear in ``inputs.outputs`` under the
  head's name and its other outputs under ``'<name>/<key>'`` (``'features'``, FRSKD's refined
  maps ``'frskd/stage<i>'``), and the evaluated and exported model never contains them;
* extra views of the main examples (:attr:`LossTerm.num_views`,
  ``make_views(images, key) -> [B, num_views, H, W, C]``), e.g. LSSKD's four rotations, or a
  random distortion or a mixup drawn from ``key``: the term's own key of the step, the same as
  its ``inputs.key``, so its loss can recompute the draws (coefficients, pairings). Views may be
  uint8 or float in the uint8 pixel scale. Several terms may add views (:class:`Combined`): the
  student's main pass sees ``B * V`` images, ``V = 1 + sum_t (num_views_t - 1)``, view 0 the
  original and then each term's extra views in the order of the terms; ``inputs.logits`` /
  ``inputs.outputs`` hold view 0 and each term's ``inputs.views`` view 0 and its own views;
* extra groups of examples and forward passes over them (:attr:`LossTerm.forwards`, each a
  :class:`Forward`): the ``'partner'`` group (a same-class example for every main example) or the
  ``'previous'`` group (the previous step's main examples), each independently augmented, seen by
  the student (with or without gradient), by the EMA copy of the student, or by a frozen teacher;
  or the ``'again'`` group: the main examples under a second, independent draw of the training
  augmentation (DDGSD's two distortions; a view maker cannot redraw a crop: it sees the
  augmented image, not the original).
  The result is ``inputs.passes[forward.name]``. Views apply to the main group only: an extra
  group is one augmented view per example. Two terms may ask for the same pass (same name, same
  settings); the trainer runs it once;
* randomness: ``inputs.key``, a PRNG key of its own per step, derived from ``(seed, step, term
  name)``, so a resumed run draws the same numbers;
* the student's own classifier (``inputs.classify(features)``: the final Dense layer applied to
  pooled features, with gradient), e.g. for SD-Dropout's dropped copies;
* state, created by the term, stored in the train state and in every checkpoint:

  * ``rows``: one row per training example (e.g. PS-KD's history of past predictions,
    ``[N, C]``), or a pytree of such ``[N, ...]`` tables (PS-KD's top-k history). The trainer keeps the table sharded along examples with the data, hands the term
    the rows of the batch's examples, and writes back the rows the term returns (skipping padding
    and duplicate indices), moving only ``O(batch x classes)`` per step.
  * ``carry``: a small pytree carried from one step to the next, replicated on every device
    (:attr:`LossTerm.carry_sharding` ``'replicated'``, e.g. DSR's previous sorted logits), or
    sharded along ``data`` with the batch (``'batch'``: every leaf ``[B, ...]``, e.g. DLB's previous
    logits, which then never cross devices).
  * an exponential moving average of the student's backbone variables
    (:attr:`LossTerm.ema_max_decay`): after every optimizer step ``ema = d ema + (1 - d) new``
    with ``d = min(1 - 1 / (t + 2), ema_max_decay)`` at update ``t = 0, 1, ...``; forward passes
    with ``network='ema'`` use it, and evaluation reports its metrics beside the student's.

BatchNorm: the main pass runs the student in train mode over the main examples' ``B * V`` views;
batch statistics are over that global batch. A student :class:`Forward` over another group is
either a separate call (``batchnorm='separate'``: its own batch statistics, as the reference
CS-KD and DLB code, and it updates the running statistics after the main pass) or part of the
main call (``batchnorm='joint'``: the statistics cover both). EMA and teacher passes run in
evaluation mode (running statistics) and update nothing.

One step::

      source.batch(step) ---> {'main', 'partner'?, 'previous'?, 'again'?}: index, valid, labels, images
            |                      |                       |
    views (main only)      student passes           EMA / teacher passes (eval mode, no gradient)
            |              (grad or not; BN joint       |
            v               or separate)                |
      student main pass -------->  TermInputs  <--------+   + rows[index], carry, key(seed, step)
      (train mode, grad)              |
                                      v
                Combined: sum_t weight_t * L_t,i  ->  mean over valid i  ->  grad
                                      |
            optimizer update -> new rows scattered, carry, EMA update, measurements,
            then each term's own parameters: one step of its optimizer on its objective

:class:`Combined` sums weighted terms (``optax.chain``'s role for losses): it is what the trainer
uses, and other JAX code can call it, or any single term, on plain arrays.

Parameters a term trains itself, with an optimizer of its own (AI-KD's discriminator,
``skd_jax.terms.aikd``): the term overrides

* :meth:`LossTerm.init_params` ``(key) -> pytree``: its initial parameters, from a PRNG key of its
  own (derived from the run's seed and the term's name);
* :meth:`LossTerm.optimizer` ``() -> optax.GradientTransformation``: how they are updated;
* :meth:`LossTerm.objective` ``(params, inputs) -> [B]``: the per-example objective they
  minimise, given the step's :class:`TermInputs` under ``stop_gradient`` (the student's outputs
  and passes before its update; no ``classify``);

and its ``__call__`` takes the keyword argument ``params``. The train state keeps the parameters
and their optimizer state under the term's name (``TrainState.term_params`` and
``term_opt_state``, replicated) and every checkpoint holds them; the export never does. In a
step, the student's loss reads the parameters as they were before the step, as constants (no
gradient of the student's loss reaches them); after the student's update, the trainer averages
the term's objective over the batch's real examples, differentiates it with respect to the
term's parameters alone and applies its optimizer (:meth:`Combined.update_params`; measured as
``objective/<term>``, its value before the update). The student's optimizer, weight decay and
gradient norm never see them.
"""

# The public names, re-exported from the private modules that define them.
from skd_jax.terms._combined import Combined
from skd_jax.terms._combined import CombinedOutput
from skd_jax.terms._protocol import Context
from skd_jax.terms._protocol import Forward
from skd_jax.terms._protocol import GROUPS
from skd_jax.terms._protocol import HeadRequest
from skd_jax.terms._protocol import LossTerm
from skd_jax.terms._protocol import NETWORKS
from skd_jax.terms._protocol import Pass
from skd_jax.terms._protocol import TermInputs
from skd_jax.terms._protocol import TermOutput
from skd_jax.terms._settings import Setting
from skd_jax.terms._settings import build
from skd_jax.terms._settings import builtin_names
from skd_jax.terms._settings import check_choice
from skd_jax.terms._settings import check_range
from skd_jax.terms._settings import from_settings
from skd_jax.terms._settings import setting
from skd_jax.terms._settings import settings
from skd_jax.terms._settings import settings_of
from skd_jax.terms._settings import term_classes
from skd_jax.terms._settings import validate

__all__ = [
    'Combined',
    'CombinedOutput',
    'Context',
    'Forward',
    'GROUPS',
    'HeadRequest',
    'LossTerm',
    'NETWORKS',
    'Pass',
    'Setting',
    'TermInputs',
    'TermOutput',
    'build',
    'builtin_names',
    'check_choice',
    'check_range',
    'from_settings',
    'setting',
    'settings',
    'settings_of',
    'term_classes',
    'validate',
]
