"""Knowledge distillation from a frozen teacher (Hinton et al., 2015): teacher KD, TF-KD (self)
and born-again generations.

The teacher is an earlier run's export, given as ``--config.teacher.workdir=DIR`` (any
architecture; ``skd_jax.networks`` loads it, normalises its input with its own statistics and
runs it in evaluation mode). It is never trained, has no gradient and is not part of this run's
checkpoints. The hard-label part is a separate ``cross_entropy`` term: weights ``1 - alpha`` and
``alpha`` give Hinton's ``(1 - alpha) CE + alpha T^2 KL``.
"""

import dataclasses

from skd_jax import losses
from skd_jax import terms


@dataclasses.dataclass(frozen=True)
class TeacherKD(terms.LossTerm):
  """``weight * T^2 KL(softmax(z_teacher/T) || softmax(z/T))``; weight is alpha."""

  weight: float = 0.9
  temperature: float = terms.setting(4.0, low=1e-3, high=1e3)
  name: str = 'teacher_kd'
  forwards = (terms.Forward('teacher', network='teacher'),)

  def __call__(self, inputs, rows=None, carry=None):
    teacher = inputs.passes['teacher']
    return terms.TermOutput(
        losses.distillation_kl(inputs.logits, teacher.logits, temperature=self.temperature)
    )
