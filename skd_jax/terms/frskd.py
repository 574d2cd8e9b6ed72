"""FRSKD: feature refinement via self-knowledge distillation (Ji et al., CVPR 2021; 2103.08273).

A self-teacher (``skd_jax.models.FRSKDHead``, head kind ``'frskd'``: a BiFPN over the backbone's
stage maps ``first_stage .. N`` with its own classifier) refines the classifier's features into
maps ``t^l`` and logits ``z_t``. It learns from its cross-entropy (its gradients also reach the
backbone through the maps it reads, as in the official code); the classifier learns from its own
cross-entropy (the separate ``cross_entropy`` term), a T^2-scaled KL from ``sg(z_t)`` and an
attention-map loss towards ``sg(t^l)`` at every level: :func:`skd_jax.losses.frskd_loss`.

The classifier's maps are ``ReLU(outputs['stage<l>'])`` (the official backbones return their
stage outputs after a ReLU; for the post-activation ResNets here the ReLU changes nothing, for
the pre-activation one it is the activation the next block would apply). The self-teacher's
refined maps are ``outputs['frskd/stage<l>']`` and its logits ``outputs['frskd']``. The head is
training-only: evaluation and export use the backbone alone.
"""

import dataclasses

import jax
import jax.numpy as jnp

from skd_jax import losses
from skd_jax import terms
from skd_jax.terms import _branches


@dataclasses.dataclass(frozen=True)
class FRSKD(terms.LossTerm):
  """``weight * frskd_loss(z, z_t, y, [f^l], [t^l])`` with the self-teacher on every stage."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  alpha: float = terms.setting(2.0, low=0, high=1e3)
  beta: float = terms.setting(100.0, low=0, high=1e4)
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  teacher_weight: float = terms.setting(1.0, low=0, high=1e3)
  width: int = terms.setting(2, low=1, high=16)
  depth: int = terms.setting(2, low=1, high=8)
  repeat: int = terms.setting(1, low=1, high=8)
  first_stage: int = terms.setting(1, low=1)  # and below the backbone's last stage (check)
  name: str = 'frskd'

  def check(self, context):
    _branches.check_first_stage(self, context, 'the self-teacher')

  @property
  def stages(self) -> tuple[int, ...]:
    return tuple(range(self.first_stage, self.num_stages + 1))

  def heads(self):
    options = (('width', self.width), ('depth', self.depth), ('repeat', self.repeat))
    return (
        terms.HeadRequest(
            self.name, 0, 'frskd', self.num_classes, stages=self.stages, options=options
        ),
    )

  def __call__(self, inputs, rows=None, carry=None):
    teacher = inputs.outputs[self.name]
    loss = losses.frskd_loss(
        inputs.logits,
        teacher,
        inputs.one_hot,
        [jax.nn.relu(inputs.outputs[f'stage{s}']) for s in self.stages],
        [inputs.outputs[f'{self.name}/stage{s}'] for s in self.stages],
        alpha=self.alpha,
        beta=self.beta,
        temperature=self.temperature,
        teacher_weight=self.teacher_weight,
    )
    top1 = 100.0 * (jnp.argmax(teacher, -1) == inputs.labels).astype(jnp.float32)
    return terms.TermOutput(loss, metrics={f'{self.name}/top1': top1})
