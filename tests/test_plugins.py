"""Terms, models and optimizers from outside skd_jax, named by import path (examples/skd_plugins):
one-line errors, the resume check, and a run that trains, resumes and exports with a term, a
model, an optimizer and data all from outside."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import runs
from skd_jax import config_lib
from skd_jax import data as data_lib
from skd_jax import export
from skd_jax import models
from skd_jax import optim as optim_lib
from skd_jax import preemption
from skd_jax import terms
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, 'examples', 'skd_plugins')
CONTEXT = terms.Context(num_classes=4, num_epochs=2, batch_size=2)
PENALTY = 'skd_plugins.confidence_penalty'


@pytest.fixture(autouse=True)
def _importable(monkeypatch, tmp_path_factory):
  """skd_plugins as `pip install -e examples/skd_plugins` (or PYTHONPATH) makes it importable,
  a module `wrong` whose make(settings, context) returns 42 and a module `maker` whose make returns
  a label-smoothing term."""
  monkeypatch.syspath_prepend(EXAMPLE)
  wrong = tmp_path_factory.mktemp('wrong')
  (wrong / 'wrong.py').write_text('def make(settings, context):\n  return 42\n')
  (wrong / 'maker.py').write_text(
      'from skd_jax import terms\n'
      'from skd_jax.terms import label_smoothing\n'
      'def make(settings, context):\n'
      '  epsilon = terms.check_range(settings, "epsilon", 0, 0.5, "ls", 0.2)\n'
      '  return label_smoothing.LabelSmoothing(weight=float(settings.weight), epsilon=epsilon)\n'
  )
  monkeypatch.syspath_prepend(str(wrong))


def _npz(directory, shape=(16, 16, 3)):
  """train.npz (72 images) and test.npz (32) of random images for skd_plugins.npz_data."""
  rng = np.random.default_rng(0)
  for split, n in (('train', runs.NUM_EXAMPLES), ('test', 32)):
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    np.savez(directory / f'{split}.npz', images=images, labels=np.arange(n) % 10, num_classes=10)
  return str(directory)


def _example_config():
  """The plug-in sections of examples/skd_plugins/config.py on the tests' small mocked run."""
  spec = importlib.util.spec_from_file_location('skd_plugins_config', f'{EXAMPLE}/config.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  example = module.get_config('quick')
  config = runs.config('baseline', num_epochs=1)
  config.loss, config.model, config.optim = example.loss, example.model, example.optim
  config.model.widths, config.model.strides = (8, 16), (2, 2)
  return config


def _set(config, field, value):
  parent, _, key = field.rpartition('.')
  config[parent][key] = value


def test_a_term_from_outside_is_built_by_import_path_with_its_config_name():
  loss = ml_collections.ConfigDict({'cp': {'module': PENALTY, 'weight': 0.5}})
  method = terms.build(loss, CONTEXT)
  assert [t.name for t in method.terms] == ['cp']  # keyed by the config's name
  # Uniform predictions have the most entropy, log C: the term's loss is -log C.
  inputs = terms.TermInputs(logits=jnp.zeros((2, 4)), labels=jnp.array([0, 3]))
  out = method(inputs)
  np.testing.assert_allclose(out.losses['cp'], -np.log(4), rtol=1e-6)
  np.testing.assert_allclose(out.loss, -0.5 * np.log(4), rtol=1e-6)
  # Less entropy, a higher loss: the term pushes away from confident predictions.
  confident = terms.TermInputs(logits=jnp.array([[9.0, 0, 0, 0]] * 2), labels=jnp.array([0, 0]))
  assert (method(confident).losses['cp'] > out.losses['cp']).all()


@pytest.mark.parametrize(
    'settings, message',
    [
        (
            {'module': 'mylab.nope', 'weight': 1.0},
            r"^loss\.cp\.module: cannot import 'mylab\.nope' \(ModuleNotFoundError: No module "
            r"named 'mylab'\); is it installed or on PYTHONPATH\?$",
        ),
        ({'module': 'skd_plugins', 'weight': 1.0}, r"^loss\.cp\.module: module 'skd_plugins' has"),
        ({'module': 'wrong', 'weight': 1.0}, r'^loss\.cp\.module: make\(\) returned int; expe'),
        (
            {'module': 'skd_plugins.nets', 'weight': 1.0},
            r'^loss\.cp\.module: make\(\*, num_classes.* cannot be called as make\(ConfigDict, '
            r'Context\)',
        ),
        ({'module': 'not a path', 'weight': 1.0}, r"^loss\.cp\.module: expected a module's imp"),
        ({'module': PENALTY, 'weight': 1.0, 'beta': 2.0}, r'^loss\.cp\.beta: unknown setting'),
    ],
)
def test_a_term_from_outside_that_cannot_be_used_is_one_line_naming_the_field(settings, message):
  with pytest.raises(ConfigError, match=message) as raised:
    terms.build(ml_collections.ConfigDict({'cp': settings}), CONTEXT)
  assert '\n' not in str(raised.value)


def test_a_term_from_outside_declares_its_settings_or_provides_make():
  """skd_plugins.confidence_penalty defines a LossTerm class: its settings are checked against
  their declarations and its check() against the run (threshold <= log C); `maker` has make()."""
  build = lambda **settings: terms.build(ml_collections.ConfigDict({'cp': settings}), CONTEXT)
  (term,) = build(module=PENALTY).terms
  assert (term.name, term.weight, term.threshold) == ('cp', 0.1, 0.0)  # the declared defaults
  assert build(module=PENALTY, threshold=1).terms[0].threshold == 1.0
  for threshold, message in [
      (-0.5, r'^loss\.cp\.threshold: expected a number >= 0, got -0\.5$'),
      (True, r'^loss\.cp\.threshold: expected a number >= 0, got True$'),
      (2.0, r'^loss\.cp\.threshold: expected a number in \[0, 1\.386\d*\], got 2\.0$'),
  ]:
    with pytest.raises(ConfigError, match=message):
      build(module=PENALTY, threshold=threshold)
  (term,) = build(module='maker', weight=0.5).terms
  assert (type(term).__name__, term.name, term.weight, term.epsilon) == (
      'LabelSmoothing',
      'cp',
      0.5,
      0.2,
  )
  with pytest.raises(ConfigError, match=r'^loss\.ls\.epsilon: expected a number in \[0, 0\.5\]'):
    build(module='maker', weight=1.0, epsilon=0.7)
  with pytest.raises(ConfigError, match=r'^loss\.cp\.weight: expected a non-negative number'):
    build(module='maker')  # a make() reads settings.weight: there it is required


def test_modules_starting_with_an_underscore_are_never_terms():
  assert terms.builtin_names() == sorted(terms.settings())
  assert not [n for n in terms.builtin_names() if n.startswith('_')]
  assert {'cross_entropy', 'pskd'} <= set(terms.builtin_names())
  with pytest.raises(ConfigError, match=r'^loss\._settings: unknown loss term'):
    terms.build(ml_collections.ConfigDict({'_settings': {'weight': 1.0}}), CONTEXT)
  assert terms.LossTerm.__module__ == 'skd_jax.terms._protocol'  # re-exported


def test_a_model_and_an_optimizer_from_outside_and_their_one_line_errors():
  model = models.get_model('label', module='skd_plugins.nets', num_classes=3, widths=(4, 8))
  assert type(model).__name__ == 'SmallCNN' and model.num_stages == 2
  for kwargs, message in [
      (dict(module='mylab.nets'), r"^model\.module: cannot import 'mylab\.nets'"),
      (dict(module='skd_plugins'), r"^model\.module: module 'skd_plugins' has no function make"),
      (
          dict(module='wrong'),
          r'^model\.module: make\(settings, context\) cannot be called as '
          r'make\(num_classes=, dtype=\)',
      ),
      (dict(module='skd_plugins.nets', depth=3), r"^model\.depth: not an option of model 'skd_"),
      (dict(module='skd_plugins.nets', strides=(1,)), r'^model\.strides: expected one per width'),
  ]:
    with pytest.raises(ConfigError, match=message):
      models.get_model('label', num_classes=3, **kwargs)

  optim = config_lib.base_config(quick=True).optim
  optim.module, optim.lr, optim.weight_decay = 'skd_plugins.adamw', 1e-3, 0.5
  tx = optim_lib.make_optimizer(optim, optax.constant_schedule(1e-3))
  params = {'w': jnp.ones(3)}
  updates, _ = tx.update({'w': jnp.zeros(3)}, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -1e-3 * 0.5, rtol=1e-6)  # decoupled decay alone
  optim.module = 'wrong'
  with pytest.raises(
      ConfigError, match=r'^optim\.module: make\(\) returned int; expected an optax'
  ):
    optim_lib.make_optimizer(optim, None)


def test_validation_imports_every_plug_in_before_any_data_is_loaded():
  config = _example_config()
  config_lib.validate(config, device_count=1)
  for field in ('model.module', 'optim.module', 'loss.confidence_penalty.module', 'data.module'):
    bad = _example_config()
    _set(bad, field, 'mylab.missing')
    with pytest.raises(ConfigError, match=rf"^{field}: cannot import 'mylab.missing'"):
      config_lib.validate(bad, device_count=1)


@pytest.mark.parametrize(
    'field', ['model.module', 'optim.module', 'loss.confidence_penalty.module', 'data.module']
)
def test_changing_a_plug_ins_import_path_on_resume_is_refused(tmp_path, field):
  workdir_lib.Workdir(str(tmp_path), _example_config(), is_main=True).begin(0)
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['module'] == (
      'skd_plugins.adamw'
  )
  changed = _example_config()
  _set(changed, field, 'skd_plugins.other')
  with pytest.raises(ConfigError, match=rf'different config: {field} \('):
    workdir_lib.Workdir(str(tmp_path), changed, is_main=True)
  assert config_lib.resumable('optim.lr') and not config_lib.resumable('optim.module')


def test_the_command_line_reports_a_missing_plug_in_in_one_line_with_status_2(tmp_path):
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '1', 'PYTHONPATH': f'{REPO}:{EXAMPLE}'}
  proc = subprocess.run(
      [
          sys.executable,
          '-m',
          'skd_jax.main',
          '--config=examples/skd_plugins/config.py:quick',
          f'--workdir={tmp_path}/run',
          '--config.optim.module=mylab.opt',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 2, proc.stderr
  assert (
      proc.stderr.strip()
      .splitlines()[-1]
      .endswith(
          "optim.module: cannot import 'mylab.opt' (ModuleNotFoundError: No module named 'mylab'); "
          'is it installed or on PYTHONPATH?'
      )
  )
  assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'run')


def test_data_from_outside_is_checked_and_needs_the_device_pipeline(tmp_path):
  config = _example_config()
  config.data.module, config.data.dir = 'skd_plugins.npz_data', _npz(tmp_path)
  found = data_lib.load_split(config.data, 'test')
  assert found.images.shape == (32, 16, 16, 3) and found.num_classes == 10
  assert data_lib.identity(config.data, found.labels)['module'] == 'skd_plugins.npz_data'
  np.savez(tmp_path / 'bad.npz', images=np.zeros((4, 8, 8, 1), np.float32), labels=np.zeros(4))
  with pytest.raises(ConfigError, match=r"^data\.module: make\(data, 'bad'\) returned images flo"):
    data_lib.load_split(config.data, 'bad')
  config.data.module = 'wrong'
  with pytest.raises(ConfigError, match=r"^data\.module: make\(data, 'test'\) returned int; exp"):
    data_lib.load_split(config.data, 'test')
  config.data.module, config.data.pipeline = 'skd_plugins.npz_data', 'host'
  with pytest.raises(ConfigError, match=r"^data\.module: needs data\.pipeline='device'"):
    config_lib.validate(config, device_count=1)


@pytest.mark.slow
def test_a_run_with_a_term_model_optimizer_and_data_from_outside_resumes_and_exports(
    tmp_path, monkeypatch
):
  config = _example_config()
  config.data.module, config.data.dir = 'skd_plugins.npz_data', _npz(tmp_path)
  runs.run(config, tmp_path / 'straight', devices=2)
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 3)
    with pytest.raises(train.Preempted, match='at step 3'):
      runs.run(config, tmp_path / 'resumed', devices=2)
  runs.run(config, tmp_path / 'resumed', devices=2)
  records = runs.records(tmp_path / 'resumed')
  assert runs.without_time(records) == runs.without_time(runs.records(tmp_path / 'straight'))
  train_records = [r for r in records if r['kind'] == 'train']
  assert all('loss/confidence_penalty' in r for r in train_records)
  assert all(0 < r['confidence_penalty/entropy'] < np.log(10) for r in train_records)
  _, state = runs.restore(tmp_path / 'resumed')
  _, expected = runs.restore(tmp_path / 'straight')
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  # AdamW's state: a first and a second moment of every parameter (SGD would have one trace).
  moments = [x for x in jax.tree.leaves(state['opt_state']) if np.ndim(x) == 4]
  assert len(moments) == 2 * 2  # two conv kernels, mu and nu each

  model = export.load_model(tmp_path / 'resumed')
  assert model.spec.import_path == 'skd_plugins.nets' and type(model.module).__name__ == 'SmallCNN'
  assert model.input_shape == (16, 16, 3)  # the npz files' images
  jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(model.variables['params']),
      state['params']['backbone'],
  )
  images = np.random.default_rng(0).integers(0, 256, (4, *model.input_shape), dtype=np.uint8)
  assert np.isfinite(model(images)).all() and model(images).shape == (4, 10)
