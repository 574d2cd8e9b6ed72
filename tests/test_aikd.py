"""AI-KD and the parameters a term trains itself (its discriminator): the losses' closed forms, the
two players' separation, and in the trainer: resume, devices, checkpoint and export."""

import dataclasses
import math

import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds

import runs
import skd_jax
from skd_jax import checkpoints
from skd_jax import losses
from skd_jax import preemption
from skd_jax import state as state_lib
from skd_jax import terms
from skd_jax import train
from skd_jax.errors import ConfigError
from skd_jax.terms import aikd
from skd_jax.terms import pskd
from skd_jax.terms import teacher_kd

LOG2 = math.log(2.0)


# --- The losses -------------------------------------------------------------------------------


def test_the_adversarial_losses_match_their_closed_forms():
  d = jnp.array([-2.0, 0.0, 3.0])
  np.testing.assert_allclose(losses.adversarial_loss(d), np.log1p(np.exp(-np.asarray(d))), 1e-6)
  real, fake = jnp.array([1.0, -1.0, 0.0]), jnp.array([0.5, 2.0, 0.0])
  expected = -np.log(1 / (1 + np.exp(-np.asarray(real)))) - np.log(
      1 - 1 / (1 + np.exp(-np.asarray(fake)))
  )
  np.testing.assert_allclose(losses.discriminator_loss(real, fake), expected, rtol=1e-6)
  assert float(losses.discriminator_loss(jnp.zeros(1), jnp.zeros(1))[0]) == pytest.approx(2 * LOG2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_adversarial_losses_are_finite_per_example_and_jit_agrees(dtype):
  d = jnp.array([-50.0, 50.0, 0.0], dtype)
  for fn, args in ((losses.adversarial_loss, (d,)), (losses.discriminator_loss, (d, -d))):
    out = fn(*args)
    assert out.shape == (3,) and out.dtype == jnp.float32 and np.all(np.isfinite(out))
    np.testing.assert_allclose(jax.jit(fn)(*args), out, rtol=1e-6)
    grads = jax.grad(lambda *a, fn=fn: fn(*a).sum(), argnums=tuple(range(len(args))))(*args)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)
  jtu.check_grads(losses.adversarial_loss, (jnp.array([0.3, -1.2]),), order=2, modes=['rev'])
  jtu.check_grads(
      losses.discriminator_loss, (jnp.array([0.3, -1.2]), jnp.array([0.7, 2.0])), 2, ['rev']
  )
  with pytest.raises(ValueError, match='one shape'):
    losses.discriminator_loss(jnp.zeros(2), jnp.zeros(3))


def test_the_discriminator_is_an_mlp_with_leaky_relu():
  params = {
      'layer0': {'kernel': jnp.array([[1.0, -1.0], [0.0, 2.0]]), 'bias': jnp.array([0.0, -1.0])},
      'layer1': {'kernel': jnp.array([[1.0], [1.0]]), 'bias': jnp.array([0.5])},
  }
  probs = jnp.array([[0.25, 0.75]])
  # Hidden: [0.25, -0.25 + 1.5 - 1] = [0.25, 0.25]; then 0.25 + 0.25 + 0.5 = 1.
  assert float(aikd.discriminate(params, probs)[0]) == pytest.approx(1.0)
  probs = jnp.array([[1.0, 0.0]])  # hidden [1, -2] -> LeakyReLU [1, -0.4] -> 1 - 0.4 + 0.5
  assert float(aikd.discriminate(params, probs, negative_slope=0.2)[0]) == pytest.approx(1.1)
  term = aikd.AIKD(num_classes=5, hidden=(7, 3))
  shapes = jax.tree.map(jnp.shape, term.init_params(jax.random.key(0)))
  assert shapes == {
      'layer0': {'kernel': (5, 7), 'bias': (7,)},
      'layer1': {'kernel': (7, 3), 'bias': (3,)},
      'layer2': {'kernel': (3, 1), 'bias': (1,)},
  }


# --- The two players on plain arrays ----------------------------------------------------------


def _inputs(logits, teacher_logits, labels):
  teacher = terms.Pass(teacher_logits, labels, jnp.ones(labels.shape, bool))
  return terms.TermInputs(
      logits, labels, epoch=1, passes={'teacher': teacher}, key=jax.random.key(3)
  )


def _arrays(batch=6, classes=4):
  keys = jax.random.split(jax.random.key(0), 2)
  labels = jnp.arange(batch) % classes
  return (
      jax.random.normal(keys[0], (batch, classes)),
      3 * jax.random.normal(keys[1], (batch, classes)),
      labels,
  )


def test_the_discriminator_learns_and_its_objective_never_reaches_the_student():
  logits, teacher_logits, labels = _arrays()
  method = terms.Combined((aikd.AIKD(num_classes=4, hidden=(16,), learning_rate=1e-2),))
  params = method.init_params(jax.random.key(1))
  opt_state = method.init_opt_state(params)
  inputs = _inputs(logits, teacher_logits, labels)
  update = jax.jit(method.update_params)
  first = None
  for _ in range(100):
    new_params, opt_state, measured = update(params, opt_state, inputs)
    first = float(measured['objective/aikd']) if first is None else first
    params = new_params
  # D tells the teacher's peaked predictions from the student's flat ones.
  assert first == pytest.approx(2 * LOG2, abs=0.1)
  assert float(measured['objective/aikd']) < 0.5 * first
  out = method(inputs, params=params)
  assert float(out.metrics['aikd/fooled'].mean()) == 0.0
  # The student's loss moves its logits, through D (a constant to it) ...
  grad_z = jax.grad(lambda z: method(_inputs(z, teacher_logits, labels), params=params).loss.sum())
  assert np.any(np.asarray(grad_z(logits)) != 0)
  # ... while D's update has no gradient with respect to the student's outputs.
  opt_state = method.init_opt_state(params)
  moved = lambda z: sum(
      jnp.sum(x)
      for x in jax.tree.leaves(
          method.update_params(params, opt_state, _inputs(z, teacher_logits, labels))[0]
      )
  )
  assert not np.any(np.asarray(jax.grad(moved)(logits)))


def test_the_objective_averages_over_the_real_examples_only():
  logits, teacher_logits, labels = _arrays()
  term = aikd.AIKD(num_classes=4, hidden=(8,))
  method = terms.Combined((term,))
  params = method.init_params(jax.random.key(1))
  valid = jnp.array([True, True, True, False, False, True])
  inputs = dataclasses.replace(_inputs(logits, teacher_logits, labels), valid=valid)
  _, _, measured = method.update_params(params, method.init_opt_state(params), inputs)
  per_example = term.objective(params['aikd'], inputs)
  np.testing.assert_allclose(measured['objective/aikd'], per_example[valid].mean(), rtol=1e-6)


def test_a_zero_weight_adversarial_term_leaves_the_students_gradient_as_pskd_and_kd_alone():
  logits, teacher_logits, labels = _arrays()
  base = (
      pskd.PSKD(num_classes=4, num_epochs=4, alpha_T=0.8),
      teacher_kd.TeacherKD(weight=1.0, temperature=4.0),
  )
  with_adv = terms.Combined(base + (aikd.AIKD(num_classes=4, weight=0.0, hidden=(8,)),))
  without = terms.Combined(base)
  params = with_adv.init_params(jax.random.key(1))
  rows = {'pskd': jax.nn.softmax(teacher_logits)}

  def grad(method, **kw):
    loss = lambda z: method(_inputs(z, teacher_logits, labels), rows, **kw).loss.mean()
    return jax.grad(loss)(logits)

  np.testing.assert_array_equal(grad(with_adv, params=params), grad(without))
  assert set(with_adv.init_params(jax.random.key(1))) == {'aikd'}
  assert without.init_params(jax.random.key(1)) == {}


def test_a_term_with_parameters_needs_an_optimizer_and_settings_are_checked():
  @dataclasses.dataclass(frozen=True)
  class NoOptimizer(terms.LossTerm):
    weight: float = 1.0
    name: str = 'no_optimizer'

    def init_params(self, key):
      return {'w': jnp.zeros(2)}

    def __call__(self, inputs, rows=None, carry=None, params=None):
      return terms.TermOutput(jnp.zeros(inputs.labels.shape))

  with pytest.raises(ValueError, match='no_optimizer has parameters but no optimizer'):
    terms.Combined((NoOptimizer(),)).init_params(jax.random.key(0))

  @dataclasses.dataclass(frozen=True)
  class NoObjective(NoOptimizer):
    name: str = 'no_objective'

    def optimizer(self):
      return optax.sgd(0.1)

  with pytest.raises(ValueError, match='no_objective has parameters but no objective'):
    terms.Combined((NoObjective(),)).init_params(jax.random.key(0))
  context = terms.Context(num_classes=10, num_epochs=2, batch_size=8)
  for setting, message in (
      (dict(hidden=(8, 0)), r'loss.aikd.hidden: expected a tuple of integers >= 1, got \(8, 0\)'),
      (dict(learning_rate=2.0), r'loss.aikd.learning_rate: expected a number in \[1e-08, 1\]'),
  ):
    config = ml_collections.ConfigDict({'aikd': dict(weight=0.1, **setting)})
    with pytest.raises(ConfigError, match=message):
      terms.build(config, context)


def test_a_checkpoint_saved_before_terms_had_parameters_still_restores(tmp_path):
  state = state_lib.TrainState.create(
      apply_fn=None,
      params={'w': jnp.arange(3.0)},
      tx=optax.sgd(0.1, momentum=0.9),
      batch_stats={},
      rows={},
      carry={'pskd': None},
      ema={},
      term_params={},
      term_opt_state={},
  )
  state = jax.tree.map(jnp.asarray, state)
  older = ocp.tree.serialize_tree(state, keep_empty_nodes=True)
  del older['term_params'], older['term_opt_state']  # what the previous version saved
  saved = checkpoints.Checkpoints(tmp_path / 'c', tmp_path / 'broken', keep=2)
  saved.save(3, older, {})
  saved.close()
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
  )
  restoring = checkpoints.Checkpoints(tmp_path / 'c', tmp_path / 'broken', keep=2)
  step, restored, _ = restoring.restore(abstract)
  restoring.close()
  assert step == 3 and restored.term_params == {} and restored.term_opt_state == {}
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert not (tmp_path / 'broken').exists()


# --- In the trainer ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  return runs.untrained_teacher(tmp_path_factory.mktemp('teacher'))


def _config(teacher_workdir, **aikd_settings):
  config = runs.config('aikd')
  config.teacher.workdir = teacher_workdir
  config.loss.aikd = dict(weight=0.1, hidden=(16, 16), learning_rate=1e-3, **aikd_settings)
  return config


@pytest.mark.slow
def test_a_zero_weight_adversarial_term_trains_the_student_as_pskd_and_kd_alone(teacher):
  zero = _config(teacher)
  zero.loss.aikd.weight = 0.0
  alone = _config(teacher)
  del alone.loss['aikd']
  with tfds.testing.mock_data(num_examples=runs.NUM_EXAMPLES):
    jobs = [train.build_job(c, jax.devices()[:8]) for c in (alone, zero)]
  states = [job.state for job in jobs]
  initial = jax.device_get(states[1].term_params)  # the step donates the state
  for step in range(3):
    (states[0], measured_alone), (states[1], measured) = (
        job.step(state, step) for job, state in zip(jobs, states)
    )
    assert float(measured['grad_norm']) == pytest.approx(float(measured_alone['grad_norm']), 1e-6)
    assert np.isfinite(float(measured['objective/aikd']))
  # The student's optimizer never sees the discriminator (its state holds the backbone only).
  assert jax.tree.structure(states[1].opt_state) == jax.tree.structure(states[0].opt_state)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=5e-7),
      states[1].params,
      states[0].params,
  )
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), initial, states[1].term_params)
  assert all(jax.tree.leaves(changed))


@pytest.mark.slow
def test_aikd_resumes_bit_identically_trains_alike_on_1_and_8_devices_and_exports_no_discriminator(
    tmp_path, teacher, monkeypatch
):
  runs.run(_config(teacher), tmp_path / 'straight')
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)  # mid-epoch
    with pytest.raises(train.Preempted, match='at step 7'):
      runs.run(_config(teacher), tmp_path / 'resumed')
  runs.run(_config(teacher), tmp_path / 'resumed')
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 10)
  _, expected = runs.restore(tmp_path / 'straight', 10)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  # The discriminator and its Adam state are in the checkpoint and its fingerprint.
  assert set(state['term_params']['aikd']) == {'layer0', 'layer1', 'layer2'}
  assert state['term_params']['aikd']['layer0']['kernel'].shape == (10, 16)
  assert jax.tree.leaves(state['term_opt_state']['aikd'])
  assert 'term_params/aikd/layer0/kernel' in checkpoints.fingerprint(state)[0]['checksums']
  records = runs.records(tmp_path / 'straight', 'train')
  assert all(np.isfinite(r['objective/aikd']) and r['loss/aikd'] > 0 for r in records)
  # The export is the student's backbone alone.
  exported = skd_jax.load_model(tmp_path / 'straight').variables
  assert len(jax.tree.leaves(exported)) == len(jax.tree.leaves(state['params']['backbone'])) + len(
      jax.tree.leaves(state['batch_stats']['backbone'])
  )
  assert 'layer0' not in str(jax.tree_util.tree_structure(exported))
  # One device: the same losses up to reduction order.
  runs.run(_config(teacher), tmp_path / 'one', devices=1)
  one = runs.records(tmp_path / 'one', 'train')
  np.testing.assert_allclose(one[0]['loss'], records[0]['loss'], rtol=2e-4)
  np.testing.assert_allclose(one[0]['objective/aikd'], records[0]['objective/aikd'], rtol=2e-4)
  np.testing.assert_allclose([r['loss'] for r in one], [r['loss'] for r in records], rtol=1e-2)
