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

from skd_jax import errors
from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class FRSKD(terms.LossTerm):
  """``weight * frskd_loss(z, z_t, y, [f^l], [t^l])`` with the self-teacher on every stage."""

  num_classes: int
  num_stages: int
  weight: float = 1.0
  alpha: float = 2.0
  beta: float = 100.0
  temperature: float = 4.0
  teacher_weight: float = 1.0
  width: int = 2
  depth: int = 2
  repeat: int = 1
  first_stage: int = 1
  name: str = 'frskd'

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


def _integer(settings, key, default, low, high):
  value = settings.get(key, default)
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise errors.ConfigError(
        f'loss.frskd.{key}: expected an integer in [{low}, {high}], got {value!r}'
    )
  return value


def make(settings, context):
  if not context.num_stages or context.num_stages < 2:
    raise errors.ConfigError(
        'loss.frskd: the model needs at least 2 numbered stages for the self-teacher'
    )
  check = lambda key, low, high: terms.check_range(
      settings, key, low, high, 'frskd', getattr(FRSKD, key)
  )
  return FRSKD(
      num_classes=context.num_classes,
      num_stages=context.num_stages,
      weight=float(settings.weight),
      alpha=check('alpha', 0, 1e3),
      beta=check('beta', 0, 1e4),
      temperature=check('temperature', 1e-3, 1e3),
      teacher_weight=check('teacher_weight', 0, 1e3),
      width=_integer(settings, 'width', 2, 1, 16),
      depth=_integer(settings, 'depth', 2, 1, 8),
      repeat=_integer(settings, 'repeat', 1, 1, 8),
      first_stage=_integer(settings, 'first_stage', 1, 1, context.num_stages - 1),
  )
