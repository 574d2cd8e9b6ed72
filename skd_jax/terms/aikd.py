r"""AI-KD's adversarial term (Kim et al., arXiv 2211.10938; Knowledge-Based Systems 2024).

AI-KD trains the student on PS-KD's progressive targets (``loss.pskd``), on the predictions of a
frozen pre-trained copy of itself (``loss.teacher_kd`` with ``teacher.workdir``), and, this
term, to make its predictive distribution indistinguishable from the pre-trained copy's. A
discriminator ``D`` (an MLP on ``C``-class probability vectors, LeakyReLU, one logit) is this
term's own parameters, trained with its own Adam optimizer (``skd_jax.terms``: term-owned
parameters):

.. math::
  L_S &= \mathrm{BCE}\big(\sigma(D_{\phi}(\mathrm{softmax}(z))), 1\big)
      \quad \text{(this term's loss, weight } \lambda_{adv}\text{)} \\
  L_D &= \mathrm{BCE}\big(\sigma(D_{\phi}(\mathrm{softmax}(z_{pre}))), 1\big)
      + \mathrm{BCE}\big(\sigma(D_{\phi}(\mathrm{sg}\,\mathrm{softmax}(z))), 0\big)
      \quad \text{(its objective)}

with ``z`` the student's logits and ``z_pre`` the frozen copy's on the same augmented batch
(``skd_jax.losses.adversarial_loss``, ``skd_jax.losses.discriminator_loss``). One step of ``D``
per student step, on the same forward pass: the student's loss reads ``D`` as it was before the
step (a constant: no gradient reaches ``phi`` from the student); after the student's update,
``D`` takes one Adam step on ``L_D`` over that pass's outputs under ``stop_gradient`` (the
student's predictions before its update). The objective is measured as ``objective/aikd``, the
share of examples whose prediction ``D`` takes for the copy's as ``aikd/fooled``.

No official code was found; the formulas, the discriminator's shape, Adam's other settings
(optax defaults ``b1 = 0.9``, ``b2 = 0.999``) and the initialisation (uniform in
``+-1/sqrt(fan_in)``, PyTorch's ``nn.Linear`` default) are our specification, not the paper's
(docs/methods.md, AI-KD).

>>> import jax, jax.numpy as jnp
>>> from skd_jax import terms
>>> from skd_jax.terms import aikd
>>> term = aikd.AIKD(num_classes=3, hidden=(4,))
>>> params = term.init_params(jax.random.key(0))
>>> jax.tree.map(jnp.shape, params)
{'layer0': {'bias': (4,), 'kernel': (3, 4)}, 'layer1': {'bias': (1,), 'kernel': (4, 1)}}
>>> teacher = terms.Pass(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.ones(2, bool))
>>> inputs = terms.TermInputs(jnp.zeros((2, 3)), jnp.array([0, 1]), passes={'teacher': teacher})
>>> blind = jax.tree.map(jnp.zeros_like, params)  # D(p) = 0 for every p: it cannot tell
>>> term(inputs, params=blind).loss  # log 2
Array([0.6931472, 0.6931472], dtype=float32)
>>> term.objective(blind, inputs)  # 2 log 2
Array([1.3862944, 1.3862944], dtype=float32)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from skd_jax import losses
from skd_jax import terms


def discriminate(params, probs: jax.Array, *, negative_slope: float = 0.2) -> jax.Array:
  """The discriminator's ``[...]`` logits of ``[..., C]`` probabilities.

  ``params`` holds ``layer0 ... layerL`` (each ``{'kernel': [in, out], 'bias': [out]}``); every
  layer but the last is followed by a LeakyReLU of slope ``negative_slope``.
  """
  x = probs.astype(jnp.float32)
  for i in range(len(params)):
    layer = params[f'layer{i}']
    x = x @ layer['kernel'] + layer['bias']
    if i < len(params) - 1:
      x = jax.nn.leaky_relu(x, negative_slope)
  return x[..., 0]


@dataclasses.dataclass(frozen=True)
class AIKD(terms.LossTerm):
  """``weight * BCE(D(softmax(z)), 1)``; ``D`` trained on ``L_D`` with Adam (module docstring)."""

  num_classes: int
  weight: float = 0.1  # lambda_adv
  hidden: tuple[int, ...] = terms.setting((256, 256), low=1)  # the discriminator's widths
  negative_slope: float = terms.setting(0.2, low=0, high=1)  # of its LeakyReLUs
  learning_rate: float = terms.setting(1e-4, low=1e-8, high=1)  # of its Adam optimizer
  name: str = 'aikd'
  forwards = (terms.Forward('teacher', network='teacher'),)

  def init_params(self, key):
    sizes = (self.num_classes, *self.hidden, 1)
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      bound = 1.0 / math.sqrt(fan_in)
      kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, i))
      params[f'layer{i}'] = {
          'kernel': jax.random.uniform(kernel_key, (fan_in, fan_out), jnp.float32, -bound, bound),
          'bias': jax.random.uniform(bias_key, (fan_out,), jnp.float32, -bound, bound),
      }
    return params

  def optimizer(self):
    return optax.adam(self.learning_rate)

  def _discriminate(self, params, logits):
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return discriminate(params, probs, negative_slope=self.negative_slope)

  def __call__(self, inputs, rows=None, carry=None, params=None):
    fake = self._discriminate(params, inputs.logits)
    return terms.TermOutput(
        losses.adversarial_loss(fake), metrics={'aikd/fooled': (fake > 0).astype(jnp.float32)}
    )

  def objective(self, params, inputs):
    real = self._discriminate(params, inputs.passes['teacher'].logits)
    fake = self._discriminate(params, jax.lax.stop_gradient(inputs.logits))
    return losses.discriminator_loss(real, fake)
