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

import concurrent.futures
import functools
import json
import logging
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from skd_jax import checkpoints as checkpoints_lib
from skd_jax import config_lib
from skd_jax import data as data_lib
from skd_jax import evaluation
from skd_jax import mesh as mesh_lib
from skd_jax import models as models_lib
from skd_jax import networks as networks_lib
from skd_jax import optim as optim_lib
from skd_jax import preemption
from skd_jax import state as state_lib
from skd_jax import terms as terms_lib
from skd_jax import train_log
from skd_jax import workdir as workdir_lib
from skd_jax.data import samplers
from skd_jax.data import sources
from skd_jax.errors import ConfigError, Diverged, InputError, Interrupted, Preempted, SaveError
from skd_jax.mesh import make_mesh

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------------------------


class Job(NamedTuple):
  """Everything a run is built from its config: compiled functions, data and the initial state."""

  state: state_lib.TrainState
  step_fn: Any  # (state, source.step_args(step), teacher) -> (state, measurements); compiled
  eval_fn: Any  # (backbone variables, *a batch of test.batches()) -> per-example statistics
  source: Any  # skd_jax.data.sources.OnDeviceSource or skd_jax.data.streaming.HostSource
  test: Any  # skd_jax.data.sources.DeviceEvalSet or skd_jax.data.streaming.HostEvalSet
  networks: networks_lib.Networks
  teacher: Any  # the frozen teacher's variables on the devices, or None

  @property
  def steps_per_epoch(self) -> int:
    return self.source.steps_per_epoch

  def step(self, state: state_lib.TrainState, step: int):
    return self.step_fn(state, self.source.step_args(step), self.teacher)


def _evaluate(job: Job, state: state_lib.TrainState) -> dict[str, float]:
  """Test metrics of the student, and of its EMA copy (``ema/<metric>``) when there is one."""
  models = {'': networks_lib.Networks.inference(state.params, state.batch_stats)}
  if state.ema:
    models['ema/'] = state.ema
  return evaluation.evaluate(job.eval_fn, job.test, models)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _stop_if_signalled():
  """Ends start-up when a signal has arrived (to any process of the run: ``skd_jax.preemption``)."""
  signal_name = preemption.stop_before_training()
  if signal_name:
    raise Preempted(f'{signal_name} during start-up: stopped before training; nothing was written')


def build_job(config: ml_collections.ConfigDict, devices=None, check_data=None) -> Job:
  """Validates ``config``, loads the data onto the devices, builds and compiles model and loss.

  Writes nothing. Logs the devices, the data, the model and the loss. ``check_data``, if given, is
  called with the training set's identity (``skd_jax.data.identity``) as soon as it is loaded,
  before the slow part; it raises ConfigError to refuse the data.

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
  data = data_lib.open(config.data, mesh, config.eval_batch_size)  # each process its share
  test, image_shape, num_classes = data.test, data.image_shape, data.num_classes
  chosen = data.selection  # the subset and label noise, if any
  if check_data:
    check_data(data_lib.identity(config.data, data.labels, chosen))
  _stop_if_signalled()  # before the slow part: initialisation and compilation
  log.info(
      'Data: %s, %d training (%s, %s pipeline%s) and %d test (%s) images of %s, %d classes.',
      config.data.name,
      len(data.labels),
      config.data.train_split,
      config.data.pipeline,
      chosen.describe() if chosen else '',
      test.num_examples,
      config.data.test_split,
      'x'.join(map(str, image_shape)),
      num_classes,
  )
  options = {k: v for k, v in config.model.items() if k not in ('name', 'dtype', 'module')}
  spec = models_lib.ModelSpec(
      name=config.model.name,
      options={'dtype': config.model.dtype, **options},
      num_classes=num_classes,
      input_shape=tuple(image_shape),
      mean=data.mean,
      std=data.std,
      import_path=config.model.get('module', ''),  # or a plug-in's (skd_jax.plugins)
  )
  backbone = spec.module()
  context = terms_lib.Context(
      num_classes=num_classes,
      num_epochs=config.num_epochs,
      batch_size=config.batch_size,
      image_shape=image_shape,
      num_stages=getattr(backbone, 'num_stages', None),
  )
  method = terms_lib.build(config.loss, context)
  networks = networks_lib.Networks(
      spec,
      method.heads(),
      ema_max_decay=method.ema_max_decay,
      teacher=networks_lib.load_teacher(
          config.teacher.workdir, wanted=any(f.network == 'teacher' for f in method.forwards)
      ),
  )
  spe = samplers.steps_per_epoch(len(data.labels), config.batch_size)
  source = data.source(seed=config.seed, batch_size=config.batch_size, groups=method.groups)
  schedule = optim_lib.make_schedule(
      config.optim, steps_per_epoch=spe, num_epochs=config.num_epochs
  )
  tx = optim_lib.make_optimizer(config.optim, schedule)
  key = sources.run_key(config.seed, mesh)

  # Compiled ahead of time, so that start-up ends here and the progress bar times training only.
  # The steps are compiled from the initial state's shapes while the initialisation compiles and
  # runs (most of its time is compiling its random draws): XLA releases the GIL, so on several
  # cores the compilations overlap.
  started = time.perf_counter()
  shapes = state_lib.abstract_init_state(networks, tx, method, source.labels, mesh=mesh)
  teacher = networks.teacher_variables(mesh)
  replicated = mesh_lib.replicated(mesh)
  step = functools.partial(
      state_lib.train_step,
      networks=networks,
      method=method,
      mesh=mesh,
      schedule=schedule,
      steps_per_epoch=spe,
  )
  # The seed is an argument (the run's key), not a constant: every seed runs the same program.
  lowered_step = jax.jit(
      lambda state, args, teacher, key: step(
          state, source.batch(state.step, *args), teacher, key=key
      ),
      out_shardings=(jax.tree.map(lambda x: x.sharding, shapes), replicated),
      donate_argnums=(0,),
  ).lower(shapes, source.example_args(), teacher, key)
  lowered_eval = jax.jit(
      evaluation.eval_function(test, networks, mesh), out_shardings=replicated
  ).lower(networks.inference(shapes.params, shapes.batch_stats), *test.example_args())
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    compiling = pool.submit(lambda: (lowered_step.compile(), lowered_eval.compile()))
    state = state_lib.init_state(networks, tx, method, source.labels, key=key, mesh=mesh)
    compiled_step, eval_fn = compiling.result()
  step_fn = lambda state, args, teacher: compiled_step(state, args, teacher, key)
  heads = {k: _count(v) for k, v in state.params.items() if k != 'backbone'}
  log.info(
      'Model: %s %s (%s), %s parameters%s%s. Loss: %s.',
      spec.import_path or config.model.name,
      options or '',
      config.model.dtype,
      f'{_count(state.params["backbone"]):,}',
      ''.join(f' + {n:,} in the training-only head {k}' for k, n in heads.items()),
      f'; teacher {networks.teacher.spec.name}' if networks.teacher else '',
      ' + '.join(f'{t.weight:g} {t.name}' for t in method.terms),
  )
  log.info(
      'Compiled the train and evaluation steps and initialised the model in %.1f s.',
      time.perf_counter() - started,
  )
  return Job(state, step_fn, eval_fn, source, test, networks, teacher)


# ---------------------------------------------------------------------------------------------
# Train loop
# ---------------------------------------------------------------------------------------------


def _save_before(step: int, state: state_lib.TrainState, window, checkpoints) -> None:
  """Commits ``state``, the state before ``step``, unless a checkpoint of it exists (a stop before
  the first step after resuming)."""
  pending = window.check()
  if step not in checkpoints.all_steps():
    checkpoints.save(step, state, {'pending': pending})
  checkpoints.finish()


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The summary of the run that finished in ``workdir`` with ``config``, or None; reads only.

  A run is finished when its ``summary.json`` holds the summary of ``config.num_epochs`` epochs,
  its newest checkpoint is of the summary's last step, its model is exported, and ``config``
  equals the one in its ``config.json`` (a change, even to a key that may change on resume, is
  None: :func:`train_and_evaluate` applies it). What :func:`train_and_evaluate` would return for
  such a workdir is the same summary, after loading the data, building and compiling the job and
  evaluating again; this answers in a fraction of a second. None in a run of several processes,
  whose processes must take the same path.

  Raises:
    ConfigError: ``workdir`` cannot be used (``skd_jax.workdir.check_path``), or ``config`` is
      invalid, as :func:`train_and_evaluate` would.
  """
  if jax.process_count() > 1:
    return None
  workdir_lib.check_path(workdir)
  try:
    finished = workdir_lib.Workdir(workdir, config, is_main=False)
  except ConfigError:
    return None  # train_and_evaluate reports it, after the same checks
  file = finished.path / 'summary.json'
  if finished.changes or not file.exists() or not finished.model.exists():
    return None
  config_lib.validate(config, device_count=jax.device_count())
  try:
    summary = json.loads(file.read_text())
    steps = [int(p.name) for p in finished.checkpoints.iterdir() if p.name.isdigit()]
  except (OSError, ValueError):  # a damaged summary, no checkpoints: the slow path says what
    return None
  if not (
      isinstance(summary, dict)
      and summary.get('epochs') == config.num_epochs
      and steps
      and max(steps) == summary.get('steps')
  ):
    return None
  return summary


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
    InputError: the input failed (a worker died or stalled, a data file changed); in a single
      process, after saving a checkpoint at the step that could not start.
    SaveError: a checkpoint could not be written; the previous one is intact.
  """
  installed = preemption.install()
  try:
    return _train_and_evaluate(config, workdir, devices)
  finally:
    if installed:
      preemption.uninstall()


def _train_and_evaluate(config, workdir, devices):
  workdir_lib.check_path(workdir)
  # Reads only: a workdir that holds another run is refused before the data is loaded.
  workdir = workdir_lib.Workdir(workdir, config, is_main=jax.process_index() == 0)
  job = build_job(config, devices, check_data=workdir.check_data)
  try:
    _stop_if_signalled()
    # From here on the workdir is written.
    checkpoints = checkpoints_lib.Checkpoints(
        workdir.checkpoints, workdir.broken_checkpoints, keep=config.keep_checkpoints
    )
    try:
      summary = _train(config, job, workdir, checkpoints)
    except BaseException:
      try:  # the first error is the one to report
        checkpoints.close()
      except SaveError:
        pass
      raise
    checkpoints.close()
    return summary
  finally:
    job.source.close()


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
  # The source counts its waits in this loop only, timed with the same clock as this span: their
  # share of it can never exceed 100%.
  span_start = time.perf_counter()

  spe = job.steps_per_epoch
  total = config.num_epochs * spe
  window = train_log.Window(pending)
  # The measurements are fetched at log steps only; unbounded, log_every_steps small steps would be
  # in flight at once, which aborts a multi-device CPU run (mesh_lib.MAX_IN_FLIGHT).
  in_flight = mesh_lib.InFlight()
  progress = train_log.Progress(config, start, total, spe)
  result = None
  try:
    for step in range(start, total):
      try:
        if preemption.reached(step):
          raise Interrupted(step)
        args = job.source.step_args(step)
      except Interrupted:  # before the step, or while it waited for its batch
        _save_before(step, state, window, checkpoints)
        signal_name = preemption.received() or 'a signal to another process'
        raise Preempted(
            f'{signal_name}: saved a checkpoint at step {step}; rerun the same command to continue'
        ) from None
      except InputError as e:
        if jax.process_count() > 1:  # the processes save together or not at all
          raise
        _save_before(step, state, window, checkpoints)
        raise InputError(
            f'{e}; stopped, saved a checkpoint at step {step}; rerun the same command to continue'
        ) from None
      state, measured = job.step_fn(state, args, job.teacher)
      in_flight.add(measured)
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
      # End of an epoch: evaluate, checkpoint.
      epoch = done // spe
      result = _evaluate(job, state)
      result['train_seconds'] = seconds_before + time.time() - run_start
      workdir.log({'kind': 'eval', 'step': done, 'epoch': float(epoch), **result})
      log.info(
          'epoch %d/%d: %s',
          epoch,
          config.num_epochs,
          ', '.join(f'{k} {v:.4g}' for k, v in result.items() if not isinstance(v, dict)),
      )
      if job.source.wait_seconds:
        span = time.perf_counter() - span_start
        log.info(
            'The input pipeline kept training waiting for %.1f s of %.1f s so far (%.1f%%).',
            job.source.wait_seconds,
            span,
            100 * job.source.wait_seconds / span,
        )
      if epoch % config.checkpoint_every_epochs == 0 or done == total:
        checkpoints.save(done, state, {'pending': window.check()})
  except FloatingPointError as e:
    checkpoints.finish()
    raise Diverged(str(e), checkpoints.latest_step(), checkpoints.directory) from None
  finally:
    progress.close()

  if result is None:  # the run had already finished: evaluate the restored model again
    result = _evaluate(job, state)
    result['train_seconds'] = seconds_before
  summary = evaluation.summary(
      result, workdir.records(), num_epochs=config.num_epochs, num_steps=total
  )
  job.networks.export(workdir.model, state.params, state.batch_stats)
  workdir.write_summary(summary)
  return summary
