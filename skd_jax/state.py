"""The train state, its initialisation on the devices, and the update step.

:class:`TrainState` holds everything a run continues from (``skd_jax.checkpoints`` saves it
whole): the student's parameters and optimizer state, BatchNorm statistics, the terms' per-example
rows (sharded along ``data`` by example, ``skd_jax.example_rows``) and step-to-step carry, the
EMA copy, and the parameters that terms train themselves with their optimizer states.
:func:`init_state` creates it with its final shardings, :func:`abstract_init_state` gives its
shapes without computing it, and :func:`train_step` is one SGD step on the global batch,
compiled by ``skd_jax.train.build_job``. The run's PRNG key is an argument of both, so
every seed shares one compiled program.
"""

import dataclasses
import functools
from typing import Any

import flax.training.train_state
import jax
import jax.numpy as jnp
import optax

from skd_jax import example_rows
from skd_jax import mesh as mesh_lib
from skd_jax import networks as networks_lib
from skd_jax import terms as terms_lib
from skd_jax.data import sources

_TERMS = 3  # fold-in constant of the terms' PRNG stream (skd_jax.data.sources uses 1, 2, 4-7)
_TERM_PARAMS = 8  # fold-in constant of the key that initialises the terms' own parameters


class TrainState(flax.training.train_state.TrainState):
  """The student's parameters and optimizer state, plus BatchNorm statistics and the terms' state.

  ``params`` and ``batch_stats`` hold the backbone under ``'backbone'`` and each training-only
  head under its name; ``ema`` is the EMA copy of the backbone, if a term keeps one
  (``skd_jax.networks``).

  ``term_params`` and ``term_opt_state`` are the parameters that terms train themselves (AI-KD's
  discriminator) and their optimizer states, by term name, replicated. The student's ``tx``
  never sees them: they have no part in its gradient, weight decay or gradient norm, and the
  export (the backbone) never holds them.
  """

  batch_stats: Any
  rows: dict[str, Any]  # term name -> pytree of per-example tables, sharded along examples
  carry: dict[str, Any]  # term name -> step-to-step state, replicated or sharded with the batch
  ema: dict[str, Any]  # {'params', 'batch_stats'} of the backbone's EMA copy, or {}
  term_params: dict[str, Any]  # term name -> parameters the term trains itself
  term_opt_state: dict[str, Any]  # term name -> their optimizer state


def _initializers(networks: networks_lib.Networks, tx, method: terms_lib.Combined, mesh):
  """The jitted parts of :func:`init_state` and the shardings of their results.

  Returns ``(model, rows, carry, shardings)``: ``model(key)`` is the state without rows and
  carry, ``rows(labels)`` the per-example rows of the padded labels, ``carry()`` the terms' carry,
  and ``shardings(state)`` the sharding of every leaf of a state.
  """
  replicated = mesh_lib.replicated(mesh)
  sharded = mesh_lib.sharded(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def model(key):
    variables = networks.init(jax.random.fold_in(key, 0))
    term_params = method.init_params(jax.random.fold_in(key, _TERM_PARAMS))
    return TrainState.create(
        apply_fn=networks.student.apply,
        tx=tx,
        rows={},
        carry={},
        ema=networks.init_ema(variables['params'], variables['batch_stats']),
        term_params=term_params,
        term_opt_state=method.init_opt_state(term_params),
        **variables,
    )

  carry_shardings = {
      name: sharded if kind == 'batch' else replicated
      for name, kind in method.carry_sharding().items()
  }
  rows = jax.jit(method.init_rows, out_shardings=mesh_lib.sharded(mesh))
  carry = jax.jit(method.init_carry, out_shardings=carry_shardings)

  def shardings(state):
    on = lambda sharding, tree: jax.tree.map(lambda _: sharding, tree)
    return jax.tree.map(lambda _: replicated, state).replace(
        rows=on(mesh_lib.sharded(mesh), state.rows),
        carry={name: on(carry_shardings[name], tree) for name, tree in state.carry.items()},
    )

  return model, rows, carry, shardings


def init_state(
    networks: networks_lib.Networks,
    tx,
    method: terms_lib.Combined,
    labels: jax.Array,
    *,
    key: jax.Array,
    mesh,
) -> TrainState:
  """The initial state, created on the devices with its final shardings.

  ``labels`` are the ``[N]`` training labels from which ``method`` creates its per-example rows;
  ``key`` is the run's PRNG key (``skd_jax.data.sources.run_key``), an argument of the compiled
  initialisation so that every seed shares one program.
  """
  model, rows, carry, _ = _initializers(networks, tx, method, mesh)
  num_rows = example_rows.padded_rows(labels.shape[0], mesh)
  labels = jnp.pad(labels, (0, num_rows - labels.shape[0]))
  return model(key).replace(rows=rows(labels), carry=carry())


def abstract_init_state(
    networks: networks_lib.Networks,
    tx,
    method: terms_lib.Combined,
    labels: jax.Array,
    *,
    mesh,
) -> TrainState:
  """What :func:`init_state` returns, as ``jax.ShapeDtypeStruct`` s with their shardings, without
  compiling or running the initialisation (to compile the steps at the same time)."""
  model, rows, carry, shardings = _initializers(networks, tx, method, mesh)
  num_rows = example_rows.padded_rows(labels.shape[0], mesh)
  labels = jax.eval_shape(lambda x: jnp.pad(x, (0, num_rows - x.shape[0])), labels)
  key = jax.eval_shape(jax.random.key, 0)
  state = jax.eval_shape(model, key).replace(
      rows=jax.eval_shape(rows, labels),
      carry=jax.eval_shape(carry),
  )
  return jax.tree.map(
      lambda x, sharding: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=sharding, weak_type=x.weak_type
      ),
      state,
      shardings(state),
  )


def train_step(
    state: TrainState,
    batch: sources.Batch,
    teacher=None,
    *,
    key: jax.Array,
    networks: networks_lib.Networks,
    method: terms_lib.Combined,
    mesh,
    schedule,
    steps_per_epoch: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the global batch; returns the new state and scalar measurements.

  ``batch`` is the step's :data:`skd_jax.data.sources.Batch`; ``teacher`` the frozen teacher's
  variables (when a term asks for a teacher pass); ``key`` the run's PRNG key
  (``skd_jax.data.sources.run_key``), from which the terms' key of the step is folded. The
  measurements are the loss, each term's unweighted loss (``loss/<term>``), the terms' metrics,
  the training top-1 (%) of the final head, the learning rate and the gradient norm, all averaged
  over the batch's real examples, plus ``finite``: whether the updated parameters and BatchNorm
  statistics are all finite.

  Terms with parameters of their own (``state.term_params``): the student's loss reads them as
  they were before this step, as constants; after the student's update each term takes one step
  of its own optimizer on its objective (``objective/<term>``, measured before that step) over
  the same forward pass's outputs under ``stop_gradient``, i.e. the student's outputs before its
  update. Both players thus move from the same point, each with its own gradient.
  """
  step = state.step
  main = batch['main']
  rows = example_rows.gather(state.rows, main.index, mesh)
  weights = main.valid.astype(jnp.float32) / jnp.sum(main.valid)
  average = lambda v: jnp.sum(weights * v) if jnp.ndim(v) else v
  terms_key = sources.step_key(key, _TERMS, step)
  # Views are built per example and laid out example-major, so they stay on the example's device.
  # Each term's view maker gets the key its loss gets (Combined.term_key).
  views = method.views(main.images, terms_key)
  views = jax.lax.with_sharding_constraint(views, mesh_lib.sharded(mesh))

  def loss_fn(params):
    logits, outputs, passes, batch_stats = networks.forward(
        params, state.batch_stats, views, batch, method.forwards, ema=state.ema, teacher=teacher
    )
    inputs = terms_lib.TermInputs.from_forward(
        logits,
        outputs,
        main.labels,
        step // steps_per_epoch,
        num_views=method.num_views,
        valid=main.valid,
        passes=passes,
        key=terms_key,
        classify=functools.partial(networks.classify, params),
    )
    out = method(inputs, rows, state.carry, state.term_params)
    measured = {f'loss/{name}': average(v) for name, v in out.losses.items()}
    measured.update({k: average(v) for k, v in out.metrics.items()})
    measured['top1'] = 100.0 * average(jnp.argmax(inputs.logits, -1) == main.labels)
    # What the terms' own objectives see: the same pass, without gradient (and without the
    # classifier, a closure over the student's parameters).
    seen = jax.lax.stop_gradient(dataclasses.replace(inputs, key=None, classify=None))
    return average(out.loss), (batch_stats, out.rows, out.carry, measured, seen)

  (loss, (batch_stats, new_rows, carry, measured, seen)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats, carry=carry)
  state = state.replace(
      rows=example_rows.scatter(state.rows, main.index, new_rows, main.valid, mesh),
      ema=networks.update_ema(state.ema, state.params, state.batch_stats, step),
  )
  if state.term_params:  # after the student's update, outside its gradient and optimizer
    term_params, term_opt_state, objectives = method.update_params(
        state.term_params, state.term_opt_state, dataclasses.replace(seen, key=terms_key)
    )
    state = state.replace(term_params=term_params, term_opt_state=term_opt_state)
    measured.update(objectives)
  finite = jax.tree.leaves(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state.params))
  finite += jax.tree.leaves(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state.batch_stats))
  finite += jax.tree.leaves(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state.term_params))
  return state, {
      'loss': loss,
      'lr': schedule(step),
      'grad_norm': optax.global_norm(grads),
      'finite': jnp.all(jnp.stack(finite)),
      **measured,
  }
