"""Loss terms on plain arrays: composition, state, views, heads and config errors."""

import dataclasses
import math
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skd_jax import export
from skd_jax import losses
from skd_jax import models
from skd_jax import networks
from skd_jax import terms as terms_lib
from skd_jax.errors import ConfigError
from skd_jax.terms import cross_entropy, drg, dsr, lsskd, pskd

CONTEXT = terms_lib.Context(
    num_classes=5, num_epochs=4, batch_size=3, image_shape=(8, 8, 1), num_stages=3
)


def _inputs(key=0, batch=3, classes=5, **outputs):
  logits = jax.random.normal(jax.random.key(key), (batch, classes)) * 2
  labels = jnp.arange(batch) % classes
  return terms_lib.TermInputs(logits=logits, labels=labels, outputs=outputs, epoch=1)


def _build(**loss):
  return terms_lib.build(ml_collections.ConfigDict(loss), CONTEXT)


def test_zero_weight_terms_leave_the_cross_entropy_baseline_exactly():
  inputs = _inputs(drg=jax.random.normal(jax.random.key(1), (3, 5)))
  baseline = _build(cross_entropy=dict(weight=1.0))
  method = _build(cross_entropy=dict(weight=1.0), drg=dict(weight=0.0), dsr=dict(weight=0.0))
  carry = method(inputs, carry=method.init_carry()).carry  # DSR active from here on

  def loss_and_grad(m, c):
    return jax.value_and_grad(
        lambda z: m(terms_lib.TermInputs(z, inputs.labels, inputs.outputs), carry=c).loss.sum()
    )(inputs.logits)

  for got, want in zip(loss_and_grad(method, carry), loss_and_grad(baseline, None)):
    np.testing.assert_array_equal(got, want)


def test_combined_is_the_weighted_sum_of_its_terms():
  inputs = _inputs(drg=jax.random.normal(jax.random.key(2), (3, 5)))
  method = _build(pskd=dict(weight=0.5, alpha_T=0.8), drg=dict(weight=2.0), dsr=dict(weight=3.0))
  rows = {'pskd': jax.nn.softmax(jax.random.normal(jax.random.key(3), (3, 5)))}
  carry = {
      'dsr': {
          'sorted_logits': jnp.sort(jax.random.normal(jax.random.key(4), (3, 5)), -1),
          'has_previous': jnp.ones((), bool),
      },
      'drg': None,
      'pskd': None,
  }
  out = method(inputs, rows, carry)
  separately = (
      0.5 * pskd.PSKD(num_classes=5, num_epochs=4)(inputs, rows['pskd']).loss
      + 2.0 * drg.DRG(num_classes=5)(inputs).loss
      + 3.0 * dsr.DSR(num_classes=5, batch_size=3)(inputs, carry=carry['dsr']).loss
  )
  np.testing.assert_allclose(out.loss, separately, rtol=1e-6)
  assert set(out.losses) == {'pskd', 'drg', 'dsr'} and set(out.rows) == {'pskd'}


def test_dsr_carries_the_previous_steps_sorted_logits():
  term = dsr.DSR(num_classes=5, batch_size=3)
  first, second = _inputs(5), _inputs(6)
  out = term(first, carry=term.init_carry())
  np.testing.assert_array_equal(out.loss, 0.0)  # no previous step yet
  np.testing.assert_array_equal(out.carry['sorted_logits'], jnp.sort(first.logits, -1))
  out2 = term(second, carry=out.carry)
  np.testing.assert_allclose(
      out2.loss, losses.dsr_loss(second.logits, jnp.sort(first.logits, -1)), rtol=1e-6
  )
  # Jitted over steps as the trainer does: the carry has a fixed shape and dtype.
  jitted = jax.jit(term.__call__)
  np.testing.assert_allclose(jitted(second, carry=out.carry).loss, out2.loss, rtol=1e-6)
  assert jax.tree.map(jnp.shape, term.init_carry()) == jax.tree.map(jnp.shape, out2.carry)


def test_lsskd_views_are_the_four_rotations_example_major():
  images = jnp.arange(2 * 3 * 3 * 1, dtype=jnp.uint8).reshape(2, 3, 3, 1)
  method = _build(cross_entropy=dict(weight=1.0), lsskd=dict(weight=1.0))
  assert method.num_views == 4
  x = method.views(images)
  assert x.shape == (8, 3, 3, 1) and x.dtype == jnp.uint8
  for i in range(2):
    for k in range(4):
      np.testing.assert_array_equal(x[4 * i + k], np.rot90(images[i], k, axes=(0, 1)))


def test_lsskd_term_reads_its_heads_from_the_views():
  batch, classes = 2, 5
  key = iter(jax.random.split(jax.random.key(7), 8))
  views = {'logits': jax.random.normal(next(key), (batch, 4, classes))}
  heads = [jax.random.normal(next(key), (batch, 4, 4 * classes)) for _ in range(3)]
  views.update({f'lsskd{l + 1}': h for l, h in enumerate(heads)})
  inputs = terms_lib.TermInputs(logits=views['logits'][:, 0], labels=jnp.array([1, 3]), views=views)
  term = lsskd.LSSKD(num_classes=classes, num_stages=3, pairing='adjacent')
  expected = losses.lsskd_loss(inputs.logits, heads, inputs.one_hot, pairing='adjacent')
  out = term(inputs)
  np.testing.assert_allclose(out.loss, expected, rtol=1e-6)
  assert set(out.metrics) == {'lsskd1/top1', 'lsskd2/top1', 'lsskd3/top1'}


def test_terms_request_heads_and_the_networks_build_them_at_the_backbones_stages():
  spec = export.ModelSpec(
      'small_resnet', {'widths': (4, 8, 16), 'strides': (2, 2, 2)}, 5, (8, 8, 1), (0.5,), (0.25,)
  )
  method = _build(drg=dict(weight=1.0), lsskd=dict(weight=1.0))
  assert method.heads() == {
      'drg': (terms_lib.HeadRequest('drg', 2, 'drg', 5),),
      'lsskd': tuple(terms_lib.HeadRequest(f'lsskd{l}', l, 'later_stages', 20) for l in (1, 2, 3)),
  }
  student = networks.Networks(spec, method.heads()).student
  assert [(h.name, h.stage) for h in student.heads] == [
      ('drg', 'stage2'),
      ('lsskd1', 'stage1'),
      ('lsskd2', 'stage2'),
      ('lsskd3', 'stage3'),
  ]
  assert isinstance(student.heads[0].module, models.DRGHead)
  with pytest.raises(ConfigError, match=r'loss.drg.stage: expected a stage in 1..3, got 4'):
    networks.Networks(spec, _build(drg=dict(weight=1.0, stage=4)).heads())


@pytest.mark.parametrize(
    'loss, message',
    [
        (dict(drg=dict(weight=1.0, temprature=4.0)), r'loss.drg.temprature: unknown setting'),
        (dict(dsr=dict(weight=1.0, temperature=0.0)), r'loss.dsr.temperature: expected a number'),
        (dict(lsskd=dict(weight=1.0, pairing='random')), r'loss.lsskd.pairing: expected one of'),
        (dict(drg=dict(weight=1.0, stage='stage2')), r'loss.drg.stage: expected an integer >= 1'),
        (dict(pskd=dict(weight=-1.0)), r'loss.pskd.weight: expected a non-negative number'),
    ],
)
def test_invalid_settings_are_config_errors(loss, message):
  with pytest.raises(ConfigError, match=message):
    _build(**loss)


def _outside(spec):
  """Values ``spec`` (a declared setting) refuses: just outside its range, of another type (a
  string; True where a number is expected), a non-finite number, a value not among its choices."""
  values = []
  if spec.kind in (int, float):
    below = (lambda v: v - 1) if spec.kind is int else (lambda v: math.nextafter(v, -math.inf))
    above = (lambda v: v + 1) if spec.kind is int else (lambda v: math.nextafter(v, math.inf))
    values += [below(spec.low)] if spec.low is not None else []
    values += [above(spec.high)] if spec.high is not None else []
    values += ['1', True, float('nan') if spec.kind is float else 2.0]
  elif spec.kind is tuple:
    values += [(spec.low - 1,)] if spec.low is not None else []
    values += [(spec.high + 1,)] if spec.high is not None else []
    values += [1, '1', (True,), (1.5,)]
  elif spec.kind is bool:
    values += [1, 'True']
  elif spec.kind is str:
    values += [1] + (['not_a_choice'] if spec.choices else [])
  return values


@pytest.mark.parametrize('name', sorted(terms_lib.term_classes()))
def test_every_declared_setting_refuses_what_its_declaration_does_not_accept(name):
  """Each in one line naming loss.TERM.KEY, before the data is loaded (terms.validate) and when
  the term is built; a key that is not a setting too."""
  declared = terms_lib.settings_of(terms_lib.term_classes()[name])
  assert declared['weight'].low == 0 and declared['weight'].kind is float
  cases = [(key, value) for key, spec in declared.items() for value in _outside(spec)]
  assert all(_outside(spec) for spec in declared.values())  # each has a kind that is checked
  for key, value in cases + [('no_such_setting', 1.0)]:
    loss = ml_collections.ConfigDict({name: {'weight': 1.0, key: value}})
    for check in (terms_lib.validate, lambda l: terms_lib.build(l, CONTEXT)):
      with pytest.raises(ConfigError) as raised:
        check(loss)
      message = str(raised.value)
      assert message.startswith(f'loss.{name}.{key}: '), message
      assert '\n' not in message
      if key != 'no_such_setting':
        assert message.endswith(f', got {value!r}'), message


@pytest.mark.parametrize('name', sorted(terms_lib.term_classes()))
def test_a_config_that_omits_a_setting_gets_the_default_help_shows(name):
  """``--help`` prints terms.settings(); weight included, none is required."""
  shown = terms_lib.settings()[name]
  assert set(shown) == set(terms_lib.settings_of(terms_lib.term_classes()[name]))
  (omitted,) = _build(**{name: {}}).terms
  (explicit,) = _build(**{name: dict(shown)}).terms
  assert omitted == explicit
  for key, value in shown.items():
    # USKD's stage None is the backbone's second-to-last stage, resolved by its check().
    if (name, key) != ('uskd', 'stage'):
      assert getattr(omitted, key) == value, key


def test_label_smoothing_and_pskd_have_the_defaults_help_shows():
  (ls,) = _build(label_smoothing=dict(weight=1.0)).terms
  (ps,) = _build(pskd=dict(weight=1.0)).terms
  assert (ls.epsilon, ls.variant, ps.alpha_T) == (0.1, 'uniform', 0.8)
  assert (
      terms_lib.settings()['label_smoothing']['epsilon'],
      terms_lib.settings()['pskd']['alpha_T'],
  ) == (0.1, 0.8)


def test_a_term_module_with_make_is_still_built(monkeypatch):
  """Modules of skd_jax.terms may provide make(settings, context) instead of declarations."""
  module = types.ModuleType('skd_jax.terms.made')
  module.make = lambda settings, context: cross_entropy.CrossEntropy(
      weight=float(settings.weight), name='x'
  )
  monkeypatch.setitem(sys.modules, 'skd_jax.terms.made', module)
  (term,) = _build(made=dict(weight=0.5)).terms
  assert term == cross_entropy.CrossEntropy(weight=0.5, name='made')
  with pytest.raises(
      ConfigError, match=r'^loss\.made\.weight: expected a non-negative number, got None$'
  ):
    _build(made={})
  with pytest.raises(
      ConfigError, match=r'^loss\.made\.epsilon: unknown setting; expected one of weight$'
  ):
    _build(made=dict(weight=1.0, epsilon=0.1))


def test_context_checks_are_the_terms_own():
  """What depends on the run is checked by the term's check(), after the declarations."""
  with pytest.raises(
      ConfigError, match=r'^loss\.byot\.first_stage: expected an integer in \[1, 2\], got 3$'
  ):
    _build(byot=dict(first_stage=3))
  (uskd,) = _build(uskd={}).terms
  assert uskd.stage == 2  # resolved from the context: the second-to-last of 3 stages
  with pytest.raises(ConfigError, match=r'^loss\.lsskd: the model has no numbered stages'):
    terms_lib.build(ml_collections.ConfigDict({'lsskd': {}}), terms_lib.Context(5, 4, 3))


def test_lsskd_needs_square_images():
  context = terms_lib.Context(5, 4, 3, image_shape=(8, 6, 3), num_stages=3)
  with pytest.raises(ConfigError, match='loss.lsskd: rotations need square images, got 8x6'):
    terms_lib.build(ml_collections.ConfigDict({'lsskd': {'weight': 1.0}}), context)


@dataclasses.dataclass(frozen=True)
class _Jitter(terms_lib.LossTerm):
  """A test viewer: two float views, the images plus noise drawn from the term's key; its loss is
  the view-1 logits' noise draw recomputed from ``inputs.key`` (to see both got the same key)."""

  weight: float = 1.0
  name: str = 'jitter'
  num_views = 3

  def make_views(self, images, key=None):
    noise = jax.random.uniform(key, (2, *images.shape))
    return jnp.stack([images, images + noise[0], images - noise[1]], axis=1).astype(jnp.float32)

  def __call__(self, inputs, rows=None, carry=None):
    assert inputs.views['logits'].shape[1] == 3
    drawn = jax.random.uniform(inputs.key, (2, inputs.labels.shape[0]))
    return terms_lib.TermOutput(drawn[0] * 0.0 + jnp.sum(inputs.views['logits'][:, 1], -1))


def test_two_viewing_terms_compose_each_seeing_view_0_and_its_own():
  """LSSKD's rotations and a random float viewer: V = 1 + 3 + 2 views, view 0 the original, then
  LSSKD's, then the jitter's; each term sees only view 0 and its own, and the jitter's view
  maker gets the key its loss gets."""
  images = jax.random.randint(jax.random.key(1), (2, 3, 3, 1), 0, 256).astype(jnp.uint8)
  rotations = lsskd.LSSKD(num_classes=5, num_stages=3)
  method = terms_lib.Combined((cross_entropy.CrossEntropy(), rotations, _Jitter()))
  assert method.num_views == 6
  assert method.view_slots() == {'cross_entropy': (0,), 'lsskd': (0, 1, 2, 3), 'jitter': (0, 4, 5)}
  key = jax.random.key(3)
  x = method.views(images, key)
  assert x.shape == (12, 3, 3, 1) and x.dtype == jnp.float32  # one float view makes all float
  own = jax.random.uniform(method.term_key(key, method.terms[2]), (2, *images.shape))
  for i in range(2):
    np.testing.assert_array_equal(x[6 * i], images[i])
    for k in range(1, 4):
      np.testing.assert_array_equal(x[6 * i + k], np.rot90(images[i], k, axes=(0, 1)))
    np.testing.assert_array_equal(x[6 * i + 4], images[i] + own[0, i])
    np.testing.assert_array_equal(x[6 * i + 5], images[i] - own[1, i])
  # The same key gives the same views (the trainer's key depends on the seed and step only).
  np.testing.assert_array_equal(method.views(images, key), x)
  assert not np.array_equal(method.views(images, jax.random.key(4)), x)
  # Each term's inputs.views: the view axis sliced to its slots.
  v = jnp.arange(2 * 6, dtype=jnp.float32).reshape(2, 6)
  views = {'logits': jnp.repeat(v[..., None], 5, -1)}
  views.update({f'lsskd{l}': jnp.zeros((2, 6, 20)) for l in (1, 2, 3)})
  inputs = terms_lib.TermInputs(views['logits'][:, 0], jnp.array([1, 3]), views=views, key=key)
  out = method(inputs)
  np.testing.assert_allclose(out.losses['jitter'], 5 * v[:, 4])  # its view 1 is combined view 4


def test_names_must_be_unique():
  with pytest.raises(ValueError, match='names must be unique'):
    terms_lib.Combined((cross_entropy.CrossEntropy(), cross_entropy.CrossEntropy()))


def test_readme_example_runs():
  """The README's "Using the losses and terms in your own code" block, executed as written."""
  with open(os.path.join(os.path.dirname(__file__), '..', 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('## Using the losses and terms in your own code') :]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert blocks
  namespace = {}
  exec(compile(blocks[0], 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['step1'].loss.shape == (2,)
  assert float(namespace['step2'].loss.sum()) > 0


def test_a_term_that_needs_an_output_the_model_lacks_is_a_one_line_config_error():
  """Zipf's LS reads ``outputs['feature_map']``; a plug-in model may not return it."""
  method = _build(zipf_ls=dict(weight=0.1))
  inputs = _inputs(features=jnp.ones((3, 4)))
  with pytest.raises(ConfigError) as error:
    method(inputs)
  assert str(error.value) == (
      "loss.zipf_ls: needs the model output 'feature_map', which this model does not return (it "
      'returns logits and features)'
  )
  assert '\n' not in str(error.value)
