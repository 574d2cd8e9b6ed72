"""Config in; trained, evaluated and checkpointed model out.

``train_and_evaluate(config, workdir)`` runs one data-parallel training job over every device of
every process:

* The mesh has one axis, ``data``. Parameters, optimizer and BatchNorm state are replicated;
  batches are split along ``data``; per-example loss state (``skd_jax.example_rows``) is sharded
  along ``data`` by example.
* BatchNorm: under ``jit`` over the global batch, Linen's BatchNorm computes batch statistics
  over the *global* batch (synchronised BN). We keep that deliberately: the model and the loss are
  then independent of the device count, so a run on 1, 8 or 256 devices trains the same model up to
  floating-point reduction order. (PyTorch DDP baselines normalise per device; with 128 images on
  one GPU the two coincide.)
* Everything a run needs to continue is in the train state (checkpointed) or derived from the step
  number: the data order from ``(seed, epoch)``, augmentation randomness from ``(seed, step)``.
"""

import functools
import logging
import signal
import time
from typing import Any, NamedTuple

from flax import struct
import flax.training.train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from skd_jax import config_lib
from skd_jax import data as data_lib
from skd_jax import example_rows
from skd_jax import metrics as metrics_lib
from skd_jax import models
from skd_jax import terms as terms_lib
from skd_jax import workdir as workdir_lib
from skd_jax.data import pipeline

log = logging.getLogger(__name__)


class TrainState(flax.training.train_state.TrainState):
  """Parameters and optimizer state, plus BatchNorm statistics and the loss terms' state.

  ``params`` and ``batch_stats`` hold the backbone under ``'backbone'`` and each training-only
  head under its name (``skd_jax.models.WithHeads``); evaluation and export use the backbone's
  subtrees alone.
  """

  batch_stats: Any
  rows: dict[str, jax.Array]  # term name -> per-example table, sharded along examples
  carry: dict[str, Any]  # term name -> step-to-step state, replicated


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: Explicit ones (the default) break Linen modules that do not annotate shardings.
  return jax.make_mesh(
      (len(devices),),
      (example_rows.AXIS,),
      axis_types=(jax.sharding.AxisType.Auto,),
      devices=devices,
  )


# ---------------------------------------------------------------------------------------------
# Input pipeline
# ---------------------------------------------------------------------------------------------


class DeviceData(struct.PyTreeNode):
  """A split on every device: uint8 images ``[N, H, W, C]`` and int32 labels ``[N]``."""

  images: jax.Array
  labels: jax.Array


def to_devices(dataset: data_lib.Dataset, mesh) -> DeviceData:
  # Every process loaded the whole split; the global array is the same data on every device.
  replicated = NamedSharding(mesh, P())
  put = lambda x: jax.make_array_from_process_local_data(replicated, x)
  return DeviceData(images=put(dataset.images), labels=put(dataset.labels.astype(np.int32)))


# ---------------------------------------------------------------------------------------------
# Model & optimizer
# ---------------------------------------------------------------------------------------------


def make_schedule(
    optim: ml_collections.ConfigDict, *, steps_per_epoch: int, num_epochs: int
) -> optax.Schedule:
  """Learning rate per step: optional linear warm-up, then step or cosine decay."""
  total = num_epochs * steps_per_epoch
  warmup = optim.warmup_epochs * steps_per_epoch
  if optim.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.lr,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=total,
        end_value=0.0,
    )
  # 'step': multiply by decay_factor at each boundary epoch (PyTorch's MultiStepLR).
  step_decay = optax.piecewise_constant_schedule(
      optim.lr, {b * steps_per_epoch: optim.decay_factor for b in optim.boundaries}
  )
  if not warmup:
    return step_decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim.lr, warmup), lambda s: step_decay(s + warmup)], [warmup]
  )


def make_optimizer(
    optim: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
  # Weight decay added to the gradient before momentum: PyTorch SGD's semantics, applied to every
  # parameter (BatchNorm and biases included) as in the reference implementations.
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay),
      optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov),
  )


def init_state(
    model, tx, method: terms_lib.Combined, train: DeviceData, image_shape, *, seed: int, mesh
) -> TrainState:
  """The initial state, created on the devices with its final shardings.

  ``model`` is the training model (backbone with heads); ``method`` creates the terms' state.
  """
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def init_model():
    variables = model.init(
        jax.random.fold_in(jax.random.key(seed), 0),
        jnp.zeros((1, *image_shape), jnp.float32),
        train=False,
    )
    return TrainState.create(
        apply_fn=model.apply,
        params=variables['params'],
        tx=tx,
        batch_stats=variables.get('batch_stats', {}),
        rows={},
        carry=method.init_carry(),
    )

  state = init_model()
  num_rows = example_rows.padded_rows(train.labels.shape[0], mesh)
  labels = jnp.pad(train.labels, (0, num_rows - train.labels.shape[0]))
  return state.replace(
      rows=jax.jit(method.init_rows, out_shardings=example_rows.sharding(mesh))(labels)
  )


# ---------------------------------------------------------------------------------------------
# Update step
# ---------------------------------------------------------------------------------------------


class Batch(NamedTuple):
  """One step's global batch.

  Attributes:
    index: ``[B]`` example indices into the training split.
    valid: ``[B]`` False on the padding slots of an epoch's last batch.
    x: ``[B * V, H, W, C]`` the model's input: ``V`` views per example, example-major.
    labels: ``[B]`` integer labels.
  """

  index: jax.Array
  valid: jax.Array
  x: jax.Array
  labels: jax.Array


def training_batch(
    step: jax.Array,
    order: jax.Array,
    train: DeviceData,
    *,
    method: terms_lib.Combined,
    mesh,
    seed: int,
    steps_per_epoch: int,
    batch_size: int,
    crop_padding: int,
    flip: bool,
    mean,
    std,
    dtype,
) -> Batch:
  """Selects, augments, expands into views and normalises step ``step``'s batch on the device."""
  num_examples = train.labels.shape[0]
  index, valid = pipeline.batch_slots(
      order, step % steps_per_epoch, num_examples=num_examples, batch_size=batch_size
  )
  batch_sharding = NamedSharding(mesh, P(example_rows.AXIS))
  images = jax.lax.with_sharding_constraint(train.images[index], batch_sharding)
  labels = jax.lax.with_sharding_constraint(train.labels[index], batch_sharding)
  aug_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), step)
  images = pipeline.augment(aug_key, images, crop_padding=crop_padding, flip=flip)
  # Views are built per example and laid out example-major, so they stay on the example's device.
  x = pipeline.normalize(method.views(images), mean, std, dtype)
  return Batch(index, valid, jax.lax.with_sharding_constraint(x, batch_sharding), labels)


def train_step(
    state: TrainState,
    order: jax.Array,
    train: DeviceData,
    *,
    method: terms_lib.Combined,
    mesh,
    schedule,
    steps_per_epoch: int,
    **batch_options,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on the global batch; returns the new state and scalar measurements.

  ``batch_options`` are :func:`training_batch`'s keyword arguments.
  """
  step = state.step
  epoch = step // steps_per_epoch
  batch = training_batch(
      step, order, train, method=method, mesh=mesh, steps_per_epoch=steps_per_epoch, **batch_options
  )
  rows = {name: example_rows.gather(table, batch.index, mesh) for name, table in state.rows.items()}
  weights = batch.valid.astype(jnp.float32) / jnp.sum(batch.valid)
  average = lambda v: jnp.sum(weights * v) if jnp.ndim(v) else v

  def loss_fn(params):
    (logits, outputs), new_model_state = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch.x,
        train=True,
        mutable=['batch_stats'],
    )
    inputs = terms_lib.TermInputs.from_forward(
        logits, outputs, batch.labels, epoch, num_views=method.num_views
    )
    out = method(inputs, rows, state.carry)
    measured = {f'loss/{name}': average(v) for name, v in out.losses.items()}
    measured.update({k: average(v) for k, v in out.metrics.items()})
    measured['accuracy'] = average(jnp.argmax(inputs.logits, -1) == batch.labels)
    return average(out.loss), (new_model_state['batch_stats'], out.rows, out.carry, measured)

  (loss, (batch_stats, new_rows, carry, measured)), grads = jax.value_and_grad(
      loss_fn, has_aux=True
  )(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats, carry=carry)
  state = state.replace(
      rows={
          name: example_rows.scatter(table, batch.index, new_rows[name], batch.valid, mesh)
          for name, table in state.rows.items()
      }
  )
  return state, {
      'loss': loss,
      'lr': schedule(step),
      'grad_norm': optax.global_norm(grads),
      **measured,
  }


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def eval_step(
    params,
    batch_stats,
    test: DeviceData,
    batch: jax.Array,
    *,
    apply_fn,
    mesh,
    batch_size: int,
    mean,
    std,
    dtype,
) -> dict[str, jax.Array]:
  """Per-example statistics of test batch ``batch`` (``valid`` marks the real examples).

  ``apply_fn`` is the backbone's: it sees only the ``'backbone'`` subtrees of the training
  ``params`` and ``batch_stats``, so auxiliary heads play no part in evaluation.
  """
  num_examples = test.labels.shape[0]
  position = batch * batch_size + jnp.arange(batch_size)
  valid = position < num_examples
  index = jax.lax.with_sharding_constraint(
      jnp.minimum(position, num_examples - 1), NamedSharding(mesh, P(example_rows.AXIS))
  )
  x = pipeline.normalize(test.images[index], mean, std, dtype)
  logits, _ = apply_fn(
      {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}, x, train=False
  )
  return {**metrics_lib.per_example_stats(logits, test.labels[index]), 'valid': valid}


def evaluate(eval_fn, state: TrainState, test: DeviceData, batch_size: int) -> dict[str, float]:
  num_batches = pipeline.steps_per_epoch(test.labels.shape[0], batch_size)
  batches = [
      eval_fn(state.params, state.batch_stats, test, np.int32(b)) for b in range(num_batches)
  ]
  stats = jax.device_get(batches)
  merged = {k: np.concatenate([b[k] for b in stats]) for k in stats[0]}
  valid = merged.pop('valid')
  return metrics_lib.summarize({k: v[valid] for k, v in merged.items()})


# ---------------------------------------------------------------------------------------------
# Checkpoint and preemption
# ---------------------------------------------------------------------------------------------


class StopRequest:
  """Turns SIGTERM and Ctrl-C into a request to save at the next step boundary and exit.

  With several processes every process must stop at the same step, so there the signal handling
  of ``jax.distributed``'s preemption service decides (it installs its own SIGTERM handler and
  agrees on a step through the coordination service); a single process handles signals itself.
  """

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if jax.process_count() == 1:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum).name

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def export_model(state: TrainState, path: str) -> None:
  """Saves the inference model: the backbone's parameters and BatchNorm statistics only.

  Restore with ``orbax.checkpoint.StandardCheckpointer().restore(path)`` and apply with the
  backbone (``skd_jax.models.get_model``) as ``model.apply(variables, x, train=False)``.
  """
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
        path,
        {'params': state.params['backbone'], 'batch_stats': state.batch_stats['backbone']},
        force=True,
    )


# ---------------------------------------------------------------------------------------------
# Train loop
# ---------------------------------------------------------------------------------------------


class Preempted(Exception):
  """Raised (and handled by ``main``) when a signal stopped the run after a checkpoint."""


def _flush(pending, workdir, epoch, bar, *, log=True):
  """Fetches pending step measurements, stops on a non-finite loss, logs their mean.

  With ``log=False`` (before a preemption checkpoint) the losses are only checked, so that the
  resumed run logs at the same steps as an uninterrupted one.
  """
  if not pending:
    return
  steps, measured = zip(*pending)
  measured = jax.device_get(measured)
  for step, m in zip(steps, measured):
    if not np.isfinite(m['loss']):
      raise FloatingPointError(f'loss is {m["loss"]} at step {step}')
  if not log:
    return
  record = {k: float(np.mean([m[k] for m in measured])) for k in measured[0]}
  workdir.log({'kind': 'train', 'step': steps[-1], 'epoch': epoch, **record})
  bar.set_postfix(loss=f'{record["loss"]:.4f}', refresh=False)
  pending.clear()


class Job(NamedTuple):
  """Everything a run is built from its config: compiled functions, data and the initial state."""

  state: TrainState
  step_fn: Any  # (state, order, train) -> (state, measurements), jitted, donates the state
  eval_fn: Any  # (params, batch_stats, test, batch) -> per-example statistics
  order_fn: Any  # (key, epoch) -> the epoch's example order
  order_key: jax.Array
  train: DeviceData
  test: DeviceData
  steps_per_epoch: int


def build_job(config: ml_collections.ConfigDict, devices=None) -> Job:
  """Validates ``config``, loads the data onto the devices, builds the model and the loss.

  Writes nothing.

  Raises:
    ConfigError: invalid configuration or data.
  """
  mesh = make_mesh(devices)
  config_lib.validate(config, device_count=mesh.size)
  train_set = data_lib.load_split(config.data, config.data.train_split)
  test_set = data_lib.load_split(config.data, config.data.test_split)
  num_classes = train_set.num_classes
  context = terms_lib.Context(
      num_classes=num_classes,
      num_epochs=config.num_epochs,
      batch_size=config.batch_size,
      image_shape=train_set.images.shape[1:],
  )
  method = terms_lib.build(config.loss, context)
  dtype = jnp.dtype(config.model.dtype)
  options = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
  backbone = models.get_model(config.model.name, num_classes=num_classes, dtype=dtype, **options)
  model = models.WithHeads(backbone, method.heads(backbone))

  num_train = len(train_set.labels)
  spe = pipeline.steps_per_epoch(num_train, config.batch_size)
  mean, std = pipeline.channel_stats(train_set.images)
  schedule = make_schedule(config.optim, steps_per_epoch=spe, num_epochs=config.num_epochs)
  train, test = to_devices(train_set, mesh), to_devices(test_set, mesh)
  state = init_state(
      model,
      make_optimizer(config.optim, schedule),
      method,
      train,
      train_set.images.shape[1:],
      seed=config.seed,
      mesh=mesh,
  )

  replicated = NamedSharding(mesh, P())
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step_fn = jax.jit(
      functools.partial(
          train_step,
          method=method,
          mesh=mesh,
          seed=config.seed,
          steps_per_epoch=spe,
          batch_size=config.batch_size,
          crop_padding=config.data.crop_padding,
          flip=config.data.flip,
          mean=mean,
          std=std,
          dtype=dtype,
          schedule=schedule,
      ),
      out_shardings=(state_shardings, replicated),
      donate_argnums=(0,),
  )
  eval_fn = jax.jit(
      functools.partial(
          eval_step,
          apply_fn=backbone.apply,
          mesh=mesh,
          batch_size=config.eval_batch_size,
          mean=mean,
          std=std,
          dtype=dtype,
      ),
      out_shardings=replicated,
  )
  order_fn = jax.jit(
      functools.partial(pipeline.epoch_order, num_examples=num_train, batch_size=config.batch_size),
      out_shardings=replicated,
  )
  return Job(
      state,
      step_fn,
      eval_fn,
      order_fn,
      jax.random.fold_in(jax.random.key(config.seed), 2),
      train,
      test,
      spe,
  )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> dict[str, Any]:
  """Trains, evaluates each epoch, checkpoints, and returns the summary.

  Args:
    config: see ``skd_jax.config_lib.base_config``.
    workdir: directory for config.json, metrics.jsonl, checkpoints, summary.json and the exported
      model; a workdir with a checkpoint is resumed.
    devices: devices to train on (default: all devices of all processes).

  Raises:
    ConfigError: invalid configuration or data, before anything is written to ``workdir``.
    FloatingPointError: a non-finite loss; the last good checkpoint is kept.
    Preempted: a signal stopped the run; a checkpoint at the current step was saved.
  """
  job = build_job(config, devices)
  # Everything is validated: from here on the workdir may be written.
  workdir = workdir_lib.Workdir(workdir, config, is_main=jax.process_index() == 0)
  state, step_fn, eval_fn, order_fn, order_key, train, test, spe = job
  total_steps = config.num_epochs * spe

  manager = ocp.CheckpointManager(
      workdir.checkpoints,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, cleanup_tmp_directories=True, create=True
      ),
  )
  try:
    start = manager.latest_step()
    if start is not None:
      state = manager.restore(start, args=ocp.args.StandardRestore(abstract(state)))
      workdir.truncate_metrics(start)
      log.info('Resumed from the checkpoint at step %d.', start)
    start = start or 0
    seconds_before = max(
        [r['train_seconds'] for r in workdir.records() if r['kind'] == 'eval'], default=0.0
    )
    run_start = time.time()

    epoch = start // spe
    order = order_fn(order_key, epoch)
    pending, result = [], None
    progress = lambda epoch, initial=0: tqdm.tqdm(
        total=spe,
        initial=initial,
        desc=f'epoch {epoch + 1}/{config.num_epochs}',
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )
    bar = progress(epoch, start % spe)
    with StopRequest() as stop:
      for step in range(start, total_steps):
        if stop.reached(step):
          _flush(pending, workdir, epoch, bar, log=False)
          if step not in manager.all_steps():  # a signal before the first step after resuming
            manager.save(step, args=ocp.args.StandardSave(state), force=True)
          manager.wait_until_finished()
          bar.close()
          raise Preempted(
              f'{stop.signal or "preemption"}: saved a checkpoint at step {step}; '
              'rerun the same command to continue'
          )
        state, measured = step_fn(state, order, train)
        pending.append((step + 1, measured))
        bar.update()
        done = step + 1
        if done % config.log_every_steps == 0 or done % spe == 0:
          _flush(pending, workdir, epoch, bar)
        if done % spe:
          continue
        # End of an epoch: evaluate, checkpoint, start the next epoch's order.
        bar.close()
        epoch += 1
        result = evaluate(eval_fn, state, test, config.eval_batch_size)
        result['train_seconds'] = seconds_before + time.time() - run_start
        workdir.log({'kind': 'eval', 'step': done, 'epoch': epoch, **result})
        log.info(
            'epoch %d/%d: %s',
            epoch,
            config.num_epochs,
            ', '.join(f'{k} {v:.4g}' for k, v in result.items()),
        )
        if epoch % config.checkpoint_every_epochs == 0 or done == total_steps:
          manager.save(done, args=ocp.args.StandardSave(state))
        if done < total_steps:
          order = order_fn(order_key, epoch)
          bar = progress(epoch)
  finally:
    manager.wait_until_finished()
    manager.close()

  if result is None:  # the run had already finished: evaluate the restored model again
    result = evaluate(eval_fn, state, test, config.eval_batch_size)
    result.update(train_seconds=seconds_before, epoch=config.num_epochs)
  else:
    result['epoch'] = config.num_epochs
  evals = [r for r in workdir.records() if r['kind'] == 'eval'] or [result]
  best = max(evals, key=lambda r: r['top1'])
  summary = {k: result[k] for k in ('top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc', 'train_seconds')}
  summary.update(
      best_top1=best['top1'], best_epoch=best['epoch'], epochs=config.num_epochs, steps=total_steps
  )
  export_model(state, workdir.model)
  workdir.write_summary(summary)
  return summary
