"""MixSKD (METHODS.md §3.11): the pure loss against the official code (golden/mixskd.npz, written
by golden/make_mixskd.py from winycg/Self-KD-Lib's ``main_mixskd_cifar.py``); the self-teacher's
affine identity; the mixed view and the loss's redraw of lam and perm; the term against the loss
computed by hand from the network's outputs; a short run preempted and resumed."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import runs
from skd_jax import config_lib
from skd_jax import export
from skd_jax import losses
from skd_jax import models
from skd_jax import networks
from skd_jax import preemption
from skd_jax import terms as terms_lib
from skd_jax import train
from skd_jax.errors import ConfigError
from skd_jax.terms import mixskd as mixskd_term

GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'mixskd.npz'
EXITS = 4


@pytest.mark.parametrize('script', ['cifar', 'imagenet'])
def test_loss_and_gradients_are_the_official_ones(script):
  """The batch mean of ours is the official step's loss (CIFAR: without the MixCE terms;
  ImageNet: with them), and its gradients w.r.t. every exit's logits and maps and the
  self-teacher's outputs agree, with the official (frozen, random) discriminators."""
  with np.load(GOLDEN) as data:
    g = dict(data)
  bs = len(g['labels'])
  discriminators = [tuple(g[f'd{k}_{p}'] for p in ('w1', 'b1', 'w2', 'b2')) for k in range(EXITS)]
  mix_ce = script == 'imagenet'

  def batch_loss(zs, fs, t_hat, t_tilde):
    per_example = losses.mixskd_loss(
        [z[:bs] for z in zs],
        [z[bs:] for z in zs],
        [f[:bs] for f in fs],
        [f[bs:] for f in fs],
        t_hat,
        t_tilde,
        g['labels'],
        lam=float(g['lam']),
        perm=g['perm'],
        temperature=float(g['kd_T']),
        mix_ce=mix_ce,
        discriminators=discriminators,
    )
    assert per_example.shape == (bs,)
    return jnp.mean(per_example)

  args = (
      [jnp.asarray(g[f'z{k}']) for k in range(EXITS)],
      [jnp.asarray(g[f'f{k}']) for k in range(EXITS)],
      jnp.asarray(g['t_hat']),
      jnp.asarray(g['t_tilde']),
  )
  loss, grads = jax.value_and_grad(batch_loss, argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(float(loss), g['loss_imagenet' if mix_ce else 'loss'], rtol=1e-5)
  prefix = 'gi_' if mix_ce else 'g_'
  wanted = (
      [g[f'{prefix}z{k}'] for k in range(EXITS)],
      [g[f'{prefix}f{k}'] for k in range(EXITS)],
      g[f'{prefix}t_hat'],
      g[f'{prefix}t_tilde'],
  )
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(wanted)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max() + 1e-12)
  jitted = jax.jit(batch_loss)(*args)
  np.testing.assert_allclose(jitted, loss, rtol=1e-6)


def test_an_unmixed_batch_has_no_distillation_feature_or_mixup_terms():
  """lam = 1 and the identity pairing: the mixture of outputs is the originals' outputs; with
  mixed outputs equal to it, only the cross-entropies remain."""
  key = iter(jax.random.split(jax.random.key(0), 8))
  z = [jax.random.normal(next(key), (3, 5)) * 2 for _ in range(2)]
  f = [jax.random.normal(next(key), (3, 2, 2, 4)) for _ in range(2)]
  y, perm = jnp.array([0, 1, 2]), jnp.arange(3)
  ce = lambda s: -jnp.take_along_axis(jax.nn.log_softmax(s), y[:, None], -1)[:, 0]
  got = losses.mixskd_loss(z, z, f, f, z[-1], z[-1], y, lam=1.0, perm=perm, mix_ce=False)
  np.testing.assert_allclose(got, ce(z[0]) + ce(z[1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.mixskd_mix(f[0], 0.25, perm[::-1]), 0.25 * f[0] + 0.75 * f[0][::-1]
  )


CONTEXT = terms_lib.Context(
    num_classes=5, num_epochs=4, batch_size=4, image_shape=(16, 16, 1), num_stages=3
)
SPEC = export.ModelSpec(
    'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (16, 16, 1), (0.5,), (0.25,)
)


def _term(**settings):
  loss = ml_collections.ConfigDict(dict(mixskd=dict(weight=1.0, **settings)))
  return terms_lib.build(loss, CONTEXT).terms[0]


def test_the_self_teacher_of_a_mixture_of_maps_is_the_mixture_of_its_outputs():
  """h (concat, 1x1 conv without bias, pooling, Dense) is affine and lam + (1 - lam) = 1, so
  h(lam F + (1 - lam) F[perm]) = lam h(F) + (1 - lam) h(F)[perm]: the term's t^."""
  key = iter(jax.random.split(jax.random.key(1), 8))
  maps = [jax.random.normal(next(key), (6, 3, 3, d)) for d in (4, 8, 16)]
  teacher = models.MixSKDTeacher(5, 16)
  rng = np.random.default_rng(1)  # random variables, a nonzero Dense bias among them
  variables = jax.tree.map(
      lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype),
      jax.eval_shape(teacher.init, next(key), maps),
  )
  lam, perm = 0.3, jax.random.permutation(next(key), 6)
  h = lambda fs: teacher.apply(variables, fs)[0]
  mixed = h([losses.mixskd_mix(f, lam, perm) for f in maps])
  np.testing.assert_allclose(mixed, losses.mixskd_mix(h(maps), lam, perm), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(mixed - h(maps))).max() > 1e-2  # the mixture changed something


def test_the_mixed_view_uses_the_lam_and_perm_the_loss_redraws_from_the_same_key():
  term = _term(alpha=0.4)
  images = jax.random.randint(jax.random.key(2), (8, 16, 16, 1), 0, 256).astype(jnp.uint8)
  key = jax.random.key(3)
  views = term.make_views(images, key)
  assert views.shape == (8, 2, 16, 16, 1) and views.dtype == jnp.float32
  lam, perm = mixskd_term.draws(key, 8, 0.4)
  assert 0 < float(lam) < 1 and sorted(np.asarray(perm).tolist()) == list(range(8))
  x = np.asarray(images, np.float32)
  np.testing.assert_array_equal(views[:, 0], x)
  np.testing.assert_allclose(views[:, 1], lam * x + (1 - lam) * x[np.asarray(perm)], rtol=1e-6)
  other, _ = mixskd_term.draws(jax.random.key(4), 8, 0.4)
  assert float(other) != float(lam)


def _tiny_network(term):
  """The small ResNet of SPEC with the term's heads, and random values of its variables' shapes
  (compiling the initialisers takes ~25 s here)."""
  nets = networks.Networks(SPEC, {term.name: term.heads()})
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
      lambda v: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype),
      jax.eval_shape(nets.init, jax.random.key(0)),
  )
  return nets, variables


@pytest.mark.parametrize('mix_ce', [False, True])
def test_the_self_teacher_learns_only_from_the_mixup_cross_entropy(mix_ce):
  """METHODS.md §3.11 pitfall 1: the official CIFAR loss (mix_ce False) uses the self-teacher h
  only as a stop-gradient teacher, so h never gets a gradient (it stays at its initialisation,
  shrunk by weight decay) while the backbone is distilled towards it; with the MixCE terms (the
  default, the ImageNet script's loss) h is trained."""
  term = _term(mix_ce=mix_ce)
  nets, variables = _tiny_network(term)
  method = terms_lib.Combined((term,))
  images = jax.random.randint(jax.random.key(5), (4, 16, 16, 1), 0, 256).astype(jnp.uint8)
  labels, key = jnp.array([0, 1, 2, 3]), jax.random.key(6)

  def mean_loss(params):
    views = method.views(images, key)
    logits, outputs, _ = nets.apply_student(
        params, variables['batch_stats'], views.reshape(8, 16, 16, 1)
    )
    inputs = terms_lib.TermInputs.from_forward(logits, outputs, labels, 0, num_views=2, key=key)
    return jnp.mean(method(inputs).losses['mixskd'])

  grads = jax.jit(jax.grad(mean_loss))(variables['params'])
  largest = lambda tree: max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(tree))
  assert largest(grads['backbone']) > 0 and largest(grads['mixskd']['branch1']) > 0
  assert (largest(grads['mixskd']['teacher']) > 0) == mix_ce


def test_the_term_is_mixskd_loss_of_the_networks_outputs_on_both_views():
  """One train-mode call of the network over both views (example-major, so BatchNorm sees
  [x; x~] together); the term's loss is mixskd_loss of the N = 3 exits (two branches, then the
  backbone), with t^ = mix(h(F)) and t~ = h(F~), and the fixed discriminators."""
  term = _term(mix_ce=True)
  (request,) = term.heads()
  assert (request.kind, request.stages) == ('mixskd', (1, 2, 3))
  nets, variables = _tiny_network(term)
  assert {'mixskd', 'backbone'} == set(variables['params'])
  assert {'branch1', 'branch2', 'teacher'} <= set(variables['params']['mixskd'])
  assert 'mixskd' not in nets.inference(variables['params'], variables['batch_stats'])['params']
  method = terms_lib.Combined((term,))
  without = terms_lib.Combined((_term(mix_ce=True, discriminators=False),))
  images = jax.random.randint(jax.random.key(5), (4, 16, 16, 1), 0, 256).astype(jnp.uint8)
  labels, key = jnp.array([0, 1, 2, 3]), jax.random.key(6)

  @jax.jit
  def losses_of(variables):
    views = method.views(images, key)
    logits, outputs, _ = nets.apply_student(
        variables['params'], variables['batch_stats'], views.reshape(8, 16, 16, 1)
    )
    inputs = terms_lib.TermInputs.from_forward(logits, outputs, labels, 0, num_views=2, key=key)
    lam, perm = mixskd_term.draws(method.term_key(key, term), 4, term.alpha)
    orig, mixed = slice(0, 8, 2), slice(1, 8, 2)  # example-major: view 0, view 1, ...
    zs = [outputs['mixskd/branch1'], outputs['mixskd/branch2'], logits]
    fs = [outputs['mixskd/map1'], outputs['mixskd/map2'], outputs['stage3']]
    assert [f.shape for f in fs] == [(8, 2, 2, 16)] * 3
    want = losses.mixskd_loss(
        [z[orig] for z in zs],
        [z[mixed] for z in zs],
        [f[orig] for f in fs],
        [f[mixed] for f in fs],
        losses.mixskd_mix(outputs['mixskd'][orig], lam, perm),
        outputs['mixskd'][mixed],
        labels,
        lam=lam,
        perm=perm,
        temperature=3.0,
        mix_ce=True,
        discriminators=mixskd_term.make_discriminators([16, 16, 16]),
    )
    got = method(inputs).losses['mixskd']
    return got, want, without(inputs).losses['mixskd']

  got, want, got_without = losses_of(variables)
  assert got.shape == (4,)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(jnp.sum(got - got_without)) > 0


def test_the_discriminators_are_constants_with_pytorchs_linear_init():
  first, again = mixskd_term.make_discriminators([16, 8]), mixskd_term.make_discriminators([16, 8])
  jax.tree.map(np.testing.assert_array_equal, first, again)
  w1, b1, w2, b2 = first[1]
  assert (w1.shape, b1.shape, w2.shape, b2.shape) == ((8, 128), (128,), (128, 2), (2,))
  assert np.abs(w1).max() <= 8**-0.5 and np.abs(b1).max() <= 8**-0.5
  assert np.abs(w2).max() <= 128**-0.5 and np.abs(w1).max() > 0.8 * 8**-0.5


def test_a_model_with_one_stage_is_a_config_error():
  loss = ml_collections.ConfigDict(dict(mixskd=dict(weight=1.0)))
  one_stage = terms_lib.Context(5, 4, 4, num_stages=1)
  with pytest.raises(ConfigError, match='loss.mixskd: the model needs at least 2'):
    terms_lib.build(loss, one_stage)


@pytest.mark.parametrize('arg', [None, 'quick', 'variant=official', 'quick,variant=official'])
def test_the_config_is_valid_and_quick_is_the_baselines_setup_but_the_loss(arg):
  # Not in test_config_and_schedule.CONFIGS: the quick run's wall time is not measured yet.
  config = importlib.import_module('configs.mixskd').get_config(arg)
  config_lib.validate(config, device_count=8)
  method = terms_lib.build(config.loss, terms_lib.Context(10, config.num_epochs, 128, num_stages=4))
  (term,) = method.terms
  assert (term.name, term.alpha, term.temperature, term.mix_ce) == ('mixskd', 0.4, 3.0, False)
  assert _term().mix_ce  # the term's own default: METHODS.md's, the loss function's
  assert method.num_views == 2 and len(term.heads()) == 1
  if arg and 'quick' in arg:
    baseline = importlib.import_module('configs.baseline').get_config('quick')
    config.loss = baseline.loss
    assert config.to_dict() == baseline.to_dict()
  elif arg:
    assert (config.batch_size, config.num_epochs, config.optim.boundaries) == (64, 205, (105, 155))
  else:
    assert (config.batch_size, config.num_epochs, config.optim.boundaries) == (128, 200, (100, 150))


@pytest.mark.slow
def test_mixskd_trains_is_preempted_and_resumes_bit_identically(tmp_path, monkeypatch):
  """One epoch of 5 steps of the quick config (narrow ResNet, mocked data, the last batch
  padded): the term's loss and metrics are finite, a run preempted mid-epoch resumes to the
  same records and state, lam is the one drawn from (seed, step), and the export is the backbone
  alone. (~1 min on a loaded 2-core CPU.)"""

  def config():
    c = runs.config('mixskd', num_epochs=1)
    c.model.widths = (4, 8, 8)
    return c

  run = lambda workdir: runs.run(config(), tmp_path / workdir, devices=2)
  run('straight')
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 3)
    with pytest.raises(train.Preempted, match='at step 3'):
      run('resumed')
  run('resumed')
  assert runs.without_time(runs.records(tmp_path / 'resumed')) == runs.without_time(
      runs.records(tmp_path / 'straight')
  )
  _, state = runs.restore(tmp_path / 'resumed', 5)
  _, expected = runs.restore(tmp_path / 'straight', 5)
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  straight = runs.records(tmp_path / 'straight', 'train')
  method = terms_lib.build(config().loss, terms_lib.Context(10, 1, 16, num_stages=3))
  lam = lambda step: mixskd_term.draws(
      method.term_key(
          jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 3), step), method.terms[0]
      ),
      16,
      0.4,
  )[0]
  start = 0
  for record in straight:  # each record: the mean over the steps since the previous one
    window = [float(lam(step)) for step in range(start, record['step'])]
    np.testing.assert_allclose(record['mixskd/lam'], np.mean(window), rtol=1e-6)
    start = record['step']
    assert np.isfinite(record['loss/mixskd']) and 0 <= record['mixskd/branch2_top1'] <= 100
  assert runs.records(tmp_path / 'straight', 'eval')
  assert 'mixskd' not in export.load_model(tmp_path / 'straight').variables['params']
