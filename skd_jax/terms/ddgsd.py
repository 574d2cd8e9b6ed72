"""DDGSD: data-distortion guided self-distillation (Ting-Bing Xu, Cheng-Lin Liu; AAAI 2019).

Every example is seen twice, under two independent draws of the training augmentation (random
crop and flip): the main examples and the source's ``'again'`` group, the same examples
augmented with a PRNG stream of their own (``skd_jax.data.sources``; the host pipeline draws it
the same way). The two distortions' predictions teach each other (``T^2 KL`` both ways, targets
without gradient) and the batch means of their pooled features are pulled together (a
linear-kernel MMD); both views get the cross-entropy. :func:`skd_jax.losses.ddgsd_loss` has the
math and the variants. The term includes both cross-entropies: do not add a ``cross_entropy``
term.

Why a group and not a view: a view maker sees the augmented image, so a distortion it drew would
be an augmentation on top of the first one; the source holds the un-augmented images and draws
the second crop and flip from the same distribution with its own key, so the two are
exchangeable. The second pass is part of the main call (``batchnorm='joint'``: one ``2B`` batch,
as both reference implementations) or a call of its own (``'separate'``, as youngerous's two
forwards). Evaluation is on the single plain image.

Reference code: yechanp/self_kd @ 9abb7e5 ``models/methods.py`` L289-323 (the defaults) and
winycg/Self-KD-Lib @ ede3062 ``methods/ddsgd.py`` (``configs/ddgsd.py``).
"""

import dataclasses

import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class DDGSD(terms.LossTerm):
  """``weight * ddgsd_loss(z1, z2, f1, f2, y)``: view 1 the main pass, view 2 the ``'again'``
  pass (named after the term), ``f`` the pooled ``'features'``."""

  weight: float = 1.0
  temperature: float = terms.setting(3.0, low=1e-3, high=1e3)
  ce_weight: float = terms.setting(1.0, low=0, high=1e3)
  kl_weight: float = terms.setting(1.0, low=0, high=1e3)
  mmd_weight: float = terms.setting(0.005, low=0, high=1e3)
  mmd: str = terms.setting('vector', choices=('vector', 'scalar'))
  batchnorm: str = terms.setting('joint', choices=('joint', 'separate'))
  name: str = 'ddgsd'

  @property
  def forwards(self):
    return (terms.Forward(self.name, group='again', grad=True, batchnorm=self.batchnorm),)

  def __call__(self, inputs, rows=None, carry=None):
    again = inputs.passes[self.name]
    loss = losses.ddgsd_loss(
        inputs.logits,
        again.logits,
        inputs.outputs['features'],
        again.outputs['features'],
        inputs.labels,
        temperature=self.temperature,
        ce_weight=self.ce_weight,
        kl_weight=self.kl_weight,
        mmd_weight=self.mmd_weight,
        mmd=self.mmd,
        valid=inputs.valid,
    )
    top1 = 100.0 * (jnp.argmax(again.logits, -1) == inputs.labels).astype(jnp.float32)
    return terms.TermOutput(loss, metrics={f'{self.name}/again_top1': top1})
