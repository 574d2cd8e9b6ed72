"""FRSKD and the registry of head kinds.

Closed forms and invariances of losses.frskd_loss; the official self-teacher, loss and gradients
(golden/frskd.npz, written by golden/make_frskd.py from MingiJi/FRSKD @ 98b87e5); registering a
head kind from outside; a multi-stage head's outputs; a few training steps, with evaluation and
export of the backbone alone.
"""

import pathlib
import re
import sys

import chex
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import runs
from skd_jax import export
from skd_jax import losses
from skd_jax import models
from skd_jax import networks
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError
from skd_jax.terms import frskd as frskd_term

CONTEXT = terms_lib.Context(
    num_classes=5, num_epochs=4, batch_size=4, image_shape=(16, 16, 1), num_stages=3
)
SPEC = export.ModelSpec(
    'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (16, 16, 1), (0.5,), (0.25,)
)
GOLDEN = pathlib.Path(__file__).parent / 'golden' / 'frskd.npz'


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_attention(f):
  f = np.asarray(f, np.float64)
  a = (f**2).mean(-1).reshape(f.shape[0], -1)
  return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def _random(key=0, batch=4, classes=5, scale=3.0):
  keys = jax.random.split(jax.random.key(key), 6)
  z = scale * jax.random.normal(keys[0], (batch, classes))
  zt = scale * jax.random.normal(keys[1], (batch, classes))
  fs = [jax.random.normal(keys[2], (batch, 4, 4, 3)), jax.random.normal(keys[3], (batch, 2, 2, 6))]
  ts = [jax.random.normal(keys[4], (batch, 4, 4, 6)), jax.random.normal(keys[5], (batch, 2, 2, 12))]
  return z, zt, jax.nn.one_hot(jnp.arange(batch) % classes, classes), fs, ts


# --- the loss ------------------------------------------------------------------------------------


def test_attention_map_closed_form():
  # Energies (mean of squares over channels) 1, 4, 0, 0 at the four positions: (1, 4, 0, 0)/sqrt(17).
  f = jnp.zeros((1, 2, 2, 2)).at[0, 0, 0].set(jnp.array([1.0, 1.0])).at[0, 0, 1].set(2.0)
  np.testing.assert_allclose(
      losses.frskd_attention_map(f)[0], np.array([1, 4, 0, 0]) / np.sqrt(17), rtol=1e-6
  )
  assert np.all(np.asarray(losses.frskd_attention_map(jnp.zeros((2, 3, 3, 4)))) == 0)


def test_two_classes_one_example():
  """Student (0, 0), teacher (log 3, 0), T = 1, alpha = 1, no maps' difference:
  H(y, z_t) + KL((3/4, 1/4) || (1/2, 1/2))."""
  z, zt = jnp.array([[0.0, 0.0]]), jnp.array([[np.log(3.0), 0.0]])
  f = [jnp.ones((1, 2, 2, 1))]
  loss = losses.frskd_loss(z, zt, jnp.array([[0.0, 1.0]]), f, f, alpha=1.0, temperature=1.0)
  kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
  np.testing.assert_allclose(loss, [np.log(4.0) + kl], rtol=1e-6)


@pytest.mark.parametrize('alpha, beta, t, w', [(2.0, 100.0, 4.0, 1.0), (0.5, 3.0, 1.5, 0.0)])
def test_matches_the_formula_in_float64(alpha, beta, t, w):
  z, zt, y, fs, ts = _random(1)
  got = losses.frskd_loss(z, zt, y, fs, ts, alpha=alpha, beta=beta, temperature=t, teacher_weight=w)
  y64 = np.asarray(y, np.float64)
  soft = np.exp(_log_softmax(np.asarray(zt) / t))
  kl = (soft * (_log_softmax(np.asarray(zt) / t) - _log_softmax(np.asarray(z) / t))).sum(-1)
  att = sum(((_numpy_attention(f) - _numpy_attention(g)) ** 2).mean(-1) for f, g in zip(fs, ts))
  want = -w * (y64 * _log_softmax(zt)).sum(-1) + alpha * t * t * kl + beta * att
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_attention_is_invariant_to_scaling_and_permuting_the_teachers_channels():
  z, zt, y, fs, ts = _random(2)
  base = losses.frskd_loss(z, zt, y, fs, ts)
  changed = [3.0 * t[..., ::-1] for t in ts]
  np.testing.assert_allclose(losses.frskd_loss(z, zt, y, fs, changed), base, rtol=1e-5)


def test_zero_weights_leave_nothing_and_identical_inputs_leave_only_the_teachers_ce():
  z, zt, y, fs, ts = _random(3)
  zero = losses.frskd_loss(z, zt, y, fs, ts, alpha=0.0, beta=0.0, teacher_weight=0.0)
  assert np.all(np.asarray(zero) == 0)
  same = losses.frskd_loss(z, z, y, fs, fs)
  np.testing.assert_allclose(same, -(np.asarray(y) * _log_softmax(z)).sum(-1), rtol=1e-6)


def test_the_teachers_maps_get_no_gradient_and_its_logits_only_the_cross_entropys():
  z, zt, y, fs, ts = _random(4)
  grads = jax.grad(lambda a, b, c: losses.frskd_loss(a, b, y, fs, c).sum(), argnums=(0, 1, 2))(
      z, zt, ts
  )
  assert all(np.all(np.asarray(g) == 0) for g in grads[2])
  np.testing.assert_allclose(grads[1], jax.nn.softmax(zt) - y, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(grads[0]) != 0)


def test_check_grads():
  # The student's side only: the teacher's logits are stop-gradient in the KL by design.
  z, zt, y, fs, ts = _random(5)
  fn = lambda a, f: losses.frskd_loss(a, zt, y, [f, fs[1]], ts, beta=10.0)
  jtu.check_grads(fn, (z, fs[0]), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_large_logits_and_zero_maps_are_finite_with_finite_gradients(dtype):
  z, zt, y, fs, ts = _random(6, scale=50.0)
  fs = [jnp.zeros_like(fs[0]), fs[1]]  # an all-zero map: the normalisation's guarded point
  fn = lambda a, f: losses.frskd_loss(
      a, zt.astype(dtype), y, [f.astype(dtype), fs[1].astype(dtype)], ts
  ).sum()
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(z.astype(dtype), fs[0])
  assert np.isfinite(float(value))
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_jit_matches_eager_and_output_is_per_example():
  z, zt, y, fs, ts = _random(7)
  eager = losses.frskd_loss(z, zt, y, fs, ts)
  chex.assert_shape(eager, (4,))
  np.testing.assert_allclose(jax.jit(losses.frskd_loss)(z, zt, y, fs, ts), eager, rtol=1e-6)


# --- the official code --------------------------------------------------------------------------


def _flax_params(g):
  """The official ``BiFPNc`` state_dict (``p:<name>``) as FRSKDHead's parameters."""
  p = lambda name: jnp.asarray(g[f'p:layers.0.{name}'])
  kernel = lambda name: p(name).transpose(2, 3, 1, 0)  # OIHW -> HWIO (depthwise: HW1C)

  def one_by_one(prefix):
    return {
        'conv': {'kernel': kernel(f'{prefix}.conv.0.0.weight')},
        'bn': {'scale': p(f'{prefix}.conv.0.1.weight'), 'bias': p(f'{prefix}.conv.0.1.bias')},
    }

  def separable(prefix):
    out = {}
    for d in range(2):  # conv.0 = (dw, pw, bn); conv.1 = (relu, dw, pw, bn)
      i = 0 if d == 0 else 1
      out[f'depthwise{d}'] = {'kernel': kernel(f'{prefix}.conv.{d}.{i}.weight')}
      out[f'pointwise{d}'] = {'kernel': kernel(f'{prefix}.conv.{d}.{i + 1}.weight')}
      out[f'bn{d}'] = {
          'scale': p(f'{prefix}.conv.{d}.{i + 2}.weight'),
          'bias': p(f'{prefix}.conv.{d}.{i + 2}.bias'),
      }
    return out

  layer = {}
  for i in range(3):
    layer[f'lat{i}'] = one_by_one(f'lat_conv.{i}')
  for i in range(2):  # levels 0, 1 of the top-down path
    layer[f'up_conv{i}'] = separable(f'up_conv.{i}')
    layer[f'up_sample{i}'] = one_by_one(f'up_sample.{i}.1')
    layer[f'up_weight{i}'] = p(f'up_weight.{i}')
  for i in range(1, 3):  # levels 1, 2 of the bottom-up path
    layer[f'trans{i}'] = one_by_one(f'lat_conv2.{i - 1}')
    layer[f'down_conv{i}'] = separable(f'down_conv.{i - 1}')
    layer[f'down_sample{i}'] = one_by_one(f'down_sample.{i - 1}.1')
    layer[f'down_weight{i}'] = p(f'down_weight.{i - 1}')
  head = {'kernel': jnp.asarray(g['p:fc.weight']).T, 'bias': jnp.asarray(g['p:fc.bias'])}
  return {'bifpn0': layer, 'head': head}


def _official_name(path):
  """The state_dict name of the FRSKDHead parameter at ``path`` (inverse of _flax_params)."""
  if path[1] == 'head':
    return f'fc.{"weight" if path[-1] == "kernel" else "bias"}'
  module, *rest = path[2:]  # path[1] is 'bifpn0'
  leaf = path[-1]

  kind, level = re.fullmatch(r'([a-z_]+?)_?(\d+)', module).groups()
  level = int(level)
  if kind in ('up_weight', 'down_weight'):
    return f'layers.0.{kind}.{level - (kind == "down_weight")}'
  prefix = {
      'lat': f'lat_conv.{level}',
      'trans': f'lat_conv2.{level - 1}',
      'up_conv': f'up_conv.{level}',
      'up_sample': f'up_sample.{level}.1',
      'down_conv': f'down_conv.{level - 1}',
      'down_sample': f'down_sample.{level - 1}.1',
  }[kind]
  sub = rest[0]
  if sub in ('conv', 'bn'):
    index = 0 if sub == 'conv' else 1
    return f'layers.0.{prefix}.conv.0.{index}.{"bias" if leaf == "bias" else "weight"}'
  d = int(sub[-1])
  offset = {'depthwise': 0, 'pointwise': 1, 'bn': 2}[sub[:-1]] + (d > 0)
  return f'layers.0.{prefix}.conv.{d}.{offset}.{"bias" if leaf == "bias" else "weight"}'


@pytest.fixture(scope='module')
def golden():
  with np.load(GOLDEN) as data:
    return dict(data)


def _official_layout(path, grad):
  grad = np.asarray(grad)
  return grad.transpose(3, 2, 0, 1) if grad.ndim == 4 else grad.T if grad.ndim == 2 else grad


def test_self_teacher_loss_and_gradients_are_the_official_ones(golden):
  """The shipped config's term and cross-entropy on the official BiFPNc's parameters and fixed
  stage maps: refined maps, logits, the loss and every gradient (stage maps, the classifier's
  logits, every parameter of the self-teacher) as the official code's, to rtol 1e-5. Both sides
  run the self-teacher in float64 (ours: the head's dtype follows the backbone's; the official:
  ``.double()``), so float32 rounding inside it does not blur the comparison; the loss itself is
  float32 here, as every skd_jax loss."""
  with jax.enable_x64(True):
    _check_against_golden(golden)


def _check_against_golden(golden):
  config = __import__('configs.frskd', fromlist=['get_config']).get_config().loss
  for key in ('alpha', 'beta', 'temperature', 'width', 'depth'):
    assert config.frskd[key] == golden[key], key
  batch, classes = golden['z'].shape
  context = terms_lib.Context(classes, 200, batch, num_stages=3)
  term = terms_lib.from_settings(frskd_term.FRSKD, config.frskd, context)
  (request,) = term.heads()
  backbone = models.small_resnet(num_classes=classes, dtype=jnp.float64)
  head = models.build_head(backbone, request, term='frskd').module
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _flax_params(golden))
  maps = [jnp.asarray(golden[f'f{i}'], jnp.float64) for i in (1, 2, 3)]
  labels = jnp.asarray(golden['labels'])
  variables = head.init(jax.random.key(0), *maps, train=False)
  assert jax.tree.structure(variables['params']) == jax.tree.structure(params)

  def batch_loss(params, z, maps):
    found, _ = head.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        *maps,
        train=True,
        mutable=['batch_stats'],
    )
    outputs = {f'stage{i}': m for i, m in zip((1, 2, 3), maps)}
    outputs.update({f'frskd/{k}': v for k, v in found.items() if k != 'logits'})
    outputs['frskd'] = found['logits']
    inputs = terms_lib.TermInputs(z, labels, outputs)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], -1)[:, 0]
    return jnp.mean(ce + term(inputs).loss), found

  z = jnp.asarray(golden['z'], jnp.float64)
  (loss, found), grads = jax.jit(jax.value_and_grad(batch_loss, argnums=(0, 1, 2), has_aux=True))(
      params, z, maps
  )
  assert loss.dtype == jnp.float64

  def close(ours, official, name, atol=1e-6):
    # The loss functions compute in float32 (skd_jax.losses casts its inputs), so entries far
    # below the largest carry float32 rounding: atol is relative to the largest entry (worst
    # seen: 1.4e-7 absolute beside 2.3).
    atol = atol * np.abs(official).max()
    np.testing.assert_allclose(ours, official, rtol=1e-5, atol=atol, err_msg=name)

  for i in (1, 2, 3):
    close(found[f'stage{i}'], golden[f't{i}'], f't{i}', atol=1e-7)  # saved in float32
  close(found['logits'], golden['zt'], 'zt')
  close(loss, golden['loss'], 'loss')
  close(grads[1], golden['g_z'], 'z')
  for i in (1, 2, 3):
    close(grads[2][i - 1], golden[f'g_f{i}'], f'f{i}')
  flat, _ = jax.tree_util.tree_flatten_with_path(grads[0])
  names = set()
  for path, g in flat:
    keys = tuple(k.key for k in path)
    name = _official_name(('params',) + keys)
    names.add(name)
    close(_official_layout(keys, g), golden[f'g:{name}'], name)
  assert names == {k[2:] for k in golden if k.startswith('g:')}


# --- heads: the registry and a multi-stage head ---------------------------------------------------


def test_an_unknown_kind_is_a_one_line_config_error_naming_the_known_ones():
  request = terms_lib.HeadRequest('aux', 2, 'no_such_kind', 5)
  with pytest.raises(
      ConfigError, match=r"loss.t: unknown head kind 'no_such_kind'; expected one"
  ) as e:
    networks.Networks(SPEC, {'t': (request,)})
  assert '\n' not in str(e.value)
  assert {'drg', 'frskd', 'later_stages', 'linear'} <= set(models.head_kinds())
  for kind in ('drg', 'frskd', 'later_stages', 'linear'):
    assert kind in str(e.value)
  bad_stage = terms_lib.HeadRequest('aux', 0, 'frskd', 5, stages=(1, 4))
  with pytest.raises(ConfigError, match=r'loss.t.stages: expected a stage in 1..3, got \(1, 4\)'):
    networks.Networks(SPEC, {'t': (bad_stage,)})
  with pytest.raises(ValueError, match='give stage or stages'):
    terms_lib.HeadRequest('aux', 2, 'frskd', 5, stages=(1, 2))


PLUGIN = '''
"""A plug-in term with its own head kind: two stages, pooled, concatenated, one Dense layer."""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from skd_jax import models
from skd_jax import terms


class TwoStageHead(nn.Module):
  num_outputs: int

  @nn.compact
  def __call__(self, a, b, *, train):
    pooled = jnp.concatenate([a.mean((1, 2)), b.mean((1, 2))], -1)
    return {'logits': nn.Dense(self.num_outputs)(pooled), 'features': pooled, 'gate': a * 0 + 1}


@models.register_head('two_stage_test')
def _build(backbone, request):
  return TwoStageHead(request.num_outputs)


@dataclasses.dataclass(frozen=True)
class Mine(terms.LossTerm):
  num_classes: int = 5
  weight: float = 1.0
  name: str = 'mine'

  def heads(self):
    return (terms.HeadRequest(self.name, 0, 'two_stage_test', self.num_classes, stages=(1, 3)),)

  def __call__(self, inputs, rows=None, carry=None):
    return terms.TermOutput(jnp.mean(inputs.outputs[self.name], -1))


def make(settings, context):
  return Mine(num_classes=context.num_classes, weight=float(settings.weight))
'''


def test_a_plug_in_module_registers_a_head_kind_that_its_term_asks_for(tmp_path, monkeypatch):
  (tmp_path / 'mylab_heads_test.py').write_text(PLUGIN)
  monkeypatch.syspath_prepend(str(tmp_path))
  loss = ml_collections.ConfigDict(dict(aux=dict(module='mylab_heads_test', weight=1.0)))
  try:
    method = terms_lib.build(loss, CONTEXT)
    assert 'two_stage_test' in models.head_kinds()
    nets = networks.Networks(SPEC, method.heads())
    variables = jax.eval_shape(nets.init, jax.random.key(0))
    assert 'aux' in variables['params']
    images = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.uint8)
    _, outputs, _ = jax.eval_shape(
        nets.apply_student, variables['params'], variables['batch_stats'], images
    )
    assert outputs['aux'].shape == (2, 5) and outputs['aux/features'].shape == (2, 4 + 16)
    assert outputs['aux/gate'].shape == outputs['stage1'].shape
  finally:
    sys.modules.pop('mylab_heads_test', None)
    models.heads._KINDS.pop('two_stage_test', None)  # pylint: disable=protected-access


def test_the_self_teacher_reads_every_stage_and_adds_its_maps_to_the_outputs():
  loss = ml_collections.ConfigDict(dict(frskd=dict(weight=1.0, width=3)))
  term = terms_lib.build(loss, CONTEXT).terms[0]
  (request,) = term.heads()
  assert (request.kind, request.stages, dict(request.options)['width']) == ('frskd', (1, 2, 3), 3)
  nets = networks.Networks(SPEC, {'frskd': term.heads()})
  variables = jax.eval_shape(nets.init, jax.random.key(0))
  assert 'frskd' in variables['params']
  assert 'frskd' not in nets.inference(variables['params'], variables['batch_stats'])['params']
  images = jax.ShapeDtypeStruct((2, 16, 16, 1), jnp.uint8)
  logits, outputs, _ = jax.eval_shape(
      nets.apply_student, variables['params'], variables['batch_stats'], images
  )
  assert outputs['frskd'].shape == logits.shape == (2, 5)
  assert outputs['frskd/features'].shape == (2, 3 * 16)
  for i, (size, width) in enumerate(((8, 4), (4, 8), (2, 16)), start=1):
    assert outputs[f'stage{i}'].shape == (2, size, size, width)
    assert outputs[f'frskd/stage{i}'].shape == (2, size, size, 3 * width)


def test_odd_stage_sizes_upsample_to_the_exact_size():
  # 28 -> 14 -> 7 -> 4: the official x2 upsampling would give 8 from 4.
  assert models.frskd.upsample_nearest(jnp.arange(4.0).reshape(1, 4, 1, 1), (7, 1))[
      0, :, 0, 0
  ].tolist() == [0, 0, 1, 1, 2, 2, 3]
  assert models.frskd.max_pool_same(jnp.zeros((1, 7, 7, 1))).shape == (1, 4, 4, 1)


@pytest.mark.parametrize(
    'settings, message',
    [
        (dict(alpha=-1.0), r'loss.frskd.alpha: expected a number'),
        (dict(width=0), r'loss.frskd.width: expected an integer in \[1, 16\]'),
        (dict(first_stage=3), r'loss.frskd.first_stage: expected an integer in \[1, 2\]'),
        (dict(stage=1), r'loss.frskd.stage: unknown setting'),
    ],
)
def test_invalid_settings_are_config_errors(settings, message):
  loss = ml_collections.ConfigDict(dict(frskd=dict(weight=1.0, **settings)))
  with pytest.raises(ConfigError, match=message):
    terms_lib.build(loss, CONTEXT)


# --- training -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_frskd_trains_and_evaluates_and_exports_the_backbone_alone(tmp_path):
  """A few steps of the quick config (one epoch of 5 steps on mocked data, narrow ResNet): the
  term's loss and the self-teacher's top-1 are measured and finite, evaluation runs, and the
  export has only the backbone's parameters. (Slow, as BYOT's: ~4 min on a loaded 2-core CPU.)"""
  config = runs.config('frskd', num_epochs=1)
  config.model.widths = (4, 8, 8)
  runs.run(config, tmp_path, devices=1)
  records = runs.records(tmp_path, 'train')
  assert records and all(np.isfinite(r['loss/frskd']) and np.isfinite(r['loss']) for r in records)
  assert all('frskd/top1' in r for r in records)
  assert runs.records(tmp_path, 'eval')
  model = export.load_model(tmp_path)
  assert 'frskd' not in model.variables['params']
  assert set(model.variables['params']) == set(
      models.small_resnet(num_classes=10, widths=(4, 8, 8), strides=(2, 2, 2)).init(
          jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
      )['params']
  )


@pytest.mark.parametrize('arg', [None, 'quick'])
def test_the_config_is_valid_and_its_quick_variant_is_the_baselines_setup(arg):
  # Not yet in test_config_and_schedule.CONFIGS: the quick run's wall time is not measured yet.
  from skd_jax import config_lib  # pylint: disable=g-import-not-at-top

  config = __import__('configs.frskd', fromlist=['get_config']).get_config(arg)
  config_lib.validate(config, device_count=8)
  method = terms_lib.build(config.loss, terms_lib.Context(10, config.num_epochs, 128, num_stages=4))
  assert [t.name for t in method.terms] == ['cross_entropy', 'frskd']
  if arg == 'quick':
    baseline = __import__('configs.baseline', fromlist=['get_config']).get_config('quick')
    config.loss = baseline.loss
    assert config.to_dict() == baseline.to_dict()
