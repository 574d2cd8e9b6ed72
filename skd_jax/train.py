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
  The measurements of steps not yet logged travel in the checkpoint too, so a resumed run writes
  the same ``metrics.jsonl`` as an uninterrupted one.
* A run never trains on, saves or exports a non-finite state: every step reports whether its loss,
  gradient norm, parameters and BatchNorm statistics are finite, these reports are checked at
  every train record and before every save, and a restored checkpoint must match its fingerprint
  (``skd_jax.checkpoints``).
"""

import functools
import logging
import time
from typing import Any, NamedTuple

from flax import struct
import flax.training.train_state
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from skd_jax import checkpoints as checkpoints_lib
from skd_jax import config_lib
from skd_jax import data as data_lib
from skd_jax import example_rows
from skd_jax import export
from skd_jax import metrics as metrics_lib
from skd_jax import models
from skd_jax import optim as optim_lib
from skd_jax import preemption
from skd_jax import terms as terms_lib
from skd_jax import train_log
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
# Model & optimizer (skd_jax.optim)
# ---------------------------------------------------------------------------------------------


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

  The measurements are the loss, each term's unweighted loss (``loss/<term>``), the terms' metrics,
  the training top-1 (%) of the final head, the learning rate and the gradient norm, all averaged
  over the batch's real examples, plus ``finite``: whether the updated parameters and BatchNorm
  statistics are all finite. ``batch_options`` are :func:`training_batch`'s keyword arguments.
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
    measured['top1'] = 100.0 * average(jnp.argmax(inputs.logits, -1) == batch.labels)
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
  finite = jax.tree.leaves(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state.params))
  finite += jax.tree.leaves(jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)), state.batch_stats))
  return state, {
      'loss': loss,
      'lr': schedule(step),
      'grad_norm': optax.global_norm(grads),
      'finite': jnp.all(jnp.stack(finite)),
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
# Building a run
# ---------------------------------------------------------------------------------------------


class Job(NamedTuple):
  """Everything a run is built from its config: compiled functions, data and the initial state."""

  state: TrainState
  step_fn: Any  # (state, order, train) -> (state, measurements), compiled, donates the state
  eval_fn: Any  # (params, batch_stats, test, batch) -> per-example statistics, compiled
  order_fn: Any  # (key, epoch) -> the epoch's example order
  order_key: jax.Array
  train: DeviceData
  test: DeviceData
  steps_per_epoch: int
  model_spec: Any  # what the exported model needs besides its variables (skd_jax.export)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _stop_if_signalled():
  """Ends start-up when a signal has arrived (single process only: ``skd_jax.preemption``)."""
  signal_name = preemption.stop_before_training()
  if signal_name:
    raise Preempted(f'{signal_name} during start-up: stopped before training; nothing was written')


def build_job(config: ml_collections.ConfigDict, devices=None) -> Job:
  """Validates ``config``, loads the data onto the devices, builds and compiles model and loss.

  Writes nothing. Logs the devices, the data, the model and the loss.

  Raises:
    ConfigError: invalid configuration or data.
    Preempted: a signal arrived during start-up.
  """
  mesh = make_mesh(devices)
  config_lib.validate(config, device_count=mesh.size)
  log.info(
      'Devices: %d x %s in %d process(es); mesh %s.',
      mesh.size,
      mesh.devices.flat[0].device_kind,
      jax.process_count(),
      dict(mesh.shape),
  )
  train_set = data_lib.load_split(config.data, config.data.train_split)
  test_set = data_lib.load_split(config.data, config.data.test_split)
  _stop_if_signalled()  # before the slow part: initialisation and compilation
  num_classes = train_set.num_classes
  image_shape = train_set.images.shape[1:]
  log.info(
      'Data: %s, %d training (%s) and %d test (%s) images of %s, %d classes.',
      config.data.name,
      len(train_set.labels),
      config.data.train_split,
      len(test_set.labels),
      config.data.test_split,
      'x'.join(map(str, image_shape)),
      num_classes,
  )
  context = terms_lib.Context(
      num_classes=num_classes,
      num_epochs=config.num_epochs,
      batch_size=config.batch_size,
      image_shape=image_shape,
  )
  method = terms_lib.build(config.loss, context)
  dtype = jnp.dtype(config.model.dtype)
  options = {k: v for k, v in config.model.items() if k not in ('name', 'dtype')}
  backbone = models.get_model(config.model.name, num_classes=num_classes, dtype=dtype, **options)
  model = models.WithHeads(backbone, method.heads(backbone))

  num_train = len(train_set.labels)
  spe = pipeline.steps_per_epoch(num_train, config.batch_size)
  mean, std = pipeline.channel_stats(train_set.images)
  schedule = optim_lib.make_schedule(
      config.optim, steps_per_epoch=spe, num_epochs=config.num_epochs
  )
  train, test = to_devices(train_set, mesh), to_devices(test_set, mesh)
  state = init_state(
      model,
      optim_lib.make_optimizer(config.optim, schedule),
      method,
      train,
      image_shape,
      seed=config.seed,
      mesh=mesh,
  )
  heads = {k: _count(v) for k, v in state.params.items() if k != 'backbone'}
  log.info(
      'Model: %s %s (%s), %s parameters%s. Loss: %s.',
      config.model.name,
      options or '',
      config.model.dtype,
      f'{_count(state.params["backbone"]):,}',
      ''.join(f' + {n:,} in the training-only head {k}' for k, n in heads.items()),
      ' + '.join(f'{t.weight:g} {t.name}' for t in method.terms),
  )

  replicated = NamedSharding(mesh, P())
  order_fn = jax.jit(
      functools.partial(pipeline.epoch_order, num_examples=num_train, batch_size=config.batch_size),
      out_shardings=replicated,
  )
  order_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  # Compiled ahead of time, so that start-up ends here and the progress bar times training only.
  started = time.perf_counter()
  step_fn = (
      jax.jit(
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
          out_shardings=(jax.tree.map(lambda x: x.sharding, state), replicated),
          donate_argnums=(0,),
      )
      .lower(state, order_fn(order_key, 0), train)
      .compile()
  )
  eval_fn = (
      jax.jit(
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
      .lower(state.params, state.batch_stats, test, np.int32(0))
      .compile()
  )
  log.info('Compiled the train and evaluation steps in %.1f s.', time.perf_counter() - started)
  model_spec = export.ModelSpec(
      name=config.model.name,
      options={'dtype': config.model.dtype, **options},
      num_classes=num_classes,
      input_shape=tuple(image_shape),
      mean=tuple(map(float, mean)),
      std=tuple(map(float, std)),
  )
  return Job(state, step_fn, eval_fn, order_fn, order_key, train, test, spe, model_spec)


# ---------------------------------------------------------------------------------------------
# Train loop
# ---------------------------------------------------------------------------------------------


class Preempted(Exception):
  """A signal stopped the run: after saving a checkpoint, or before anything was written."""


class Diverged(FloatingPointError):
  """A non-finite loss, gradient norm or state stopped the run.

  Attributes:
    kept_step: the step of the last committed checkpoint, or None when there is none.
  """

  def __init__(self, cause: str, kept_step: int | None, checkpoints: str):
    self.kept_step = kept_step
    if kept_step is None:
      kept = 'no checkpoint was saved; rerunning starts again from scratch'
    else:
      kept = f'the checkpoint at step {kept_step} is kept ({checkpoints}/{kept_step})'
    super().__init__(
        f'{cause}; stopped, {kept}. To take another path, rerun with changed optim settings, '
        'e.g. a lower --config.optim.lr (README: "Changing hyperparameters on resume")'
    )


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices=None
) -> dict[str, Any]:
  """Trains, evaluates each epoch, checkpoints, exports the model, and returns the summary.

  SIGTERM, SIGINT and SIGHUP stop the run cleanly (``skd_jax.preemption``).

  Args:
    config: see ``skd_jax.config_lib.base_config``.
    workdir: directory for the run's files (``skd_jax.workdir``); a workdir with a checkpoint is
      resumed from its newest intact checkpoint.
    devices: devices to train on (default: all devices of all processes).

  Raises:
    ConfigError: invalid configuration or data, before anything is written to ``workdir``.
    Diverged: a non-finite loss, gradient norm or state; the last good checkpoint is kept.
    Preempted: a signal stopped the run, after saving a checkpoint at the current step or, during
      start-up, before writing anything.
    checkpoints.SaveError: a checkpoint could not be written; the previous one is intact.
  """
  installed = preemption.install()
  try:
    return _train_and_evaluate(config, workdir, devices)
  finally:
    if installed:
      preemption.uninstall()


def _train_and_evaluate(config, workdir, devices):
  workdir_lib.check_path(workdir)
  job = build_job(config, devices)
  _stop_if_signalled()
  workdir = workdir_lib.Workdir(workdir, config, is_main=jax.process_index() == 0)
  # From here on the workdir is written.
  checkpoints = checkpoints_lib.Checkpoints(
      workdir.checkpoints, workdir.broken_checkpoints, keep=config.keep_checkpoints
  )
  try:
    summary = _train(config, job, workdir, checkpoints)
  except BaseException:
    try:  # the first error is the one to report
      checkpoints.close()
    except checkpoints_lib.SaveError:
      pass
    raise
  checkpoints.close()
  return summary


def _train(config, job, workdir, checkpoints) -> dict[str, Any]:
  state, start, pending = job.state, 0, []
  restored = checkpoints.restore(abstract(job.state))
  if restored is not None:
    start, state, meta = restored
    pending = meta['pending']
    log.info('Resumed from the checkpoint at step %d.', start)
  workdir.begin(start)
  evals = [r for r in workdir.records() if r['kind'] == 'eval']
  seconds_before = max([r['train_seconds'] for r in evals], default=0.0)
  run_start = time.time()

  spe = job.steps_per_epoch
  total = config.num_epochs * spe
  window = train_log.Window(pending)
  order = job.order_fn(job.order_key, start // spe)
  progress = train_log.Progress(config, start, total, spe)
  result = None
  try:
    for step in range(start, total):
      if preemption.reached(step):
        pending = window.check()
        if step not in checkpoints.all_steps():  # a signal before the first step after resuming
          checkpoints.save(step, state, {'pending': pending})
        checkpoints.finish()
        signal_name = preemption.received() or 'a signal to another process'
        raise Preempted(
            f'{signal_name}: saved a checkpoint at step {step}; rerun the same command to continue'
        )
      state, measured = job.step_fn(state, order, job.train)
      done = step + 1
      window.add(done, measured)
      checkpoints.poll()
      record = None
      if done % config.log_every_steps == 0 or done == total:
        record = {'kind': 'train', 'step': done, 'epoch': round(done / spe, 4), **window.take()}
        workdir.log(record)
      progress.update(done, record)
      if done % spe:
        continue
      # End of an epoch: evaluate, checkpoint, start the next epoch's order.
      epoch = done // spe
      result = evaluate(job.eval_fn, state, job.test, config.eval_batch_size)
      result['train_seconds'] = seconds_before + time.time() - run_start
      workdir.log({'kind': 'eval', 'step': done, 'epoch': float(epoch), **result})
      log.info(
          'epoch %d/%d: %s',
          epoch,
          config.num_epochs,
          ', '.join(f'{k} {v:.4g}' for k, v in result.items()),
      )
      if epoch % config.checkpoint_every_epochs == 0 or done == total:
        checkpoints.save(done, state, {'pending': window.check()})
      if done < total:
        order = job.order_fn(job.order_key, epoch)
  except FloatingPointError as e:
    checkpoints.finish()
    raise Diverged(str(e), checkpoints.latest_step(), checkpoints.directory) from None
  finally:
    progress.close()

  if result is None:  # the run had already finished: evaluate the restored model again
    result = evaluate(job.eval_fn, state, job.test, config.eval_batch_size)
    result['train_seconds'] = seconds_before
  evals = [r for r in workdir.records() if r['kind'] == 'eval'] or [
      {**result, 'epoch': config.num_epochs}
  ]
  best = max(evals, key=lambda r: r['top1'])
  summary = {k: result[k] for k in ('top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc', 'train_seconds')}
  summary.update(
      best_top1=best['top1'],
      best_epoch=int(best['epoch']),
      epochs=config.num_epochs,
      steps=total,
  )
  export.save_model(
      workdir.model,
      params=state.params['backbone'],
      batch_stats=state.batch_stats['backbone'],
      spec=job.model_spec,
  )
  workdir.write_summary(summary)
  return summary
