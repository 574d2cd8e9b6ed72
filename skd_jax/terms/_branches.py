"""Classifier branches on a backbone's shallow stages, one per stage: BYOT's heads, DKS's branches
(and the stage check FRSKD's self-teacher shares).

A term with branches mixes in :class:`StageBranches` before ``terms.LossTerm`` and declares the
fields ``num_classes``, ``num_stages`` (from the run) and ``first_stage`` (a setting). Its branch
on ``stage<i>`` is the ``'later_stages'`` head ``<term name><i>`` for ``i = first_stage .. N - 1``;
the deepest classifier is the student's own.
"""

import re

from skd_jax.errors import ConfigError
from skd_jax.terms._protocol import HeadRequest


def check_first_stage(term, context, needs: str) -> None:
  """Refuses a model with fewer than 2 numbered stages, or ``term.first_stage`` not below the
  last: what ``needs`` (e.g. ``'branches'``) reads from."""
  if not context.num_stages or context.num_stages < 2:
    raise ConfigError(f'loss.{term.name}: the model needs at least 2 numbered stages for {needs}')
  if term.first_stage >= context.num_stages:
    raise ConfigError(
        f'loss.{term.name}.first_stage: expected an integer in [1, {context.num_stages - 1}], '
        f'got {term.first_stage!r}'
    )


class StageBranches:
  """``check``, ``heads`` and :meth:`branch_names` of a term with one branch per shallow stage."""

  def check(self, context):
    check_first_stage(self, context, 'branches')

  def heads(self):
    return tuple(
        HeadRequest(f'{self.name}{i}', i, 'later_stages', self.num_classes)
        for i in range(self.first_stage, self.num_stages)
    )

  def branch_names(self, outputs) -> list[str]:
    """The branches' names among ``outputs``' keys, shallowest first."""
    pattern = re.compile(rf'{re.escape(self.name)}(\d+)')
    found = [(int(m.group(1)), k) for k in outputs if (m := pattern.fullmatch(k))]
    return [k for _, k in sorted(found)]
