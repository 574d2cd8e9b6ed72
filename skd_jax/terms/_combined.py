"""A weighted sum of loss terms: what the trainer calls (see ``skd_jax.terms``)."""

import dataclasses
from typing import Any, Mapping, NamedTuple
import zlib

import jax

from skd_jax.errors import ConfigError
from skd_jax.terms._protocol import Forward
from skd_jax.terms._protocol import GROUPS
from skd_jax.terms._protocol import HeadRequest
from skd_jax.terms._protocol import LossTerm
from skd_jax.terms._protocol import TermInputs


class CombinedOutput(NamedTuple):
  """:class:`Combined`'s result.

  Attributes:
    loss: ``[B]`` weighted sum of the terms' per-example losses.
    losses: term name -> its unweighted ``[B]`` loss.
    rows: term name -> the batch's new rows (stateful terms only).
    carry: term name -> next carry.
    metrics: the terms' metrics.
  """

  loss: jax.Array
  losses: dict[str, jax.Array]
  rows: dict[str, Any]
  carry: dict[str, Any]
  metrics: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Combined:
  """A weighted sum of loss terms: ``L_i = sum_t weight_t * L_t,i``.

  Rows and carries are dicts keyed by term name. At most one term may add views of the batch;
  every term then sees the same ``B * V`` forward pass. Forward passes of the same name are run
  once; EMA copies asked for by several terms must have the same decay.
  """

  terms: tuple[LossTerm, ...]

  def __post_init__(self):
    names = [t.name for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'terms: names must be unique, got {names}')
    viewers = [t.name for t in self.terms if t.num_views > 1]
    if len(viewers) > 1:
      raise ValueError(
          f'terms: {" and ".join(viewers)} both add views of the batch; at most one term may'
      )
    names = [f.name for f in self.forwards]
    for name in names:
      if names.count(name) > 1:
        raise ValueError(f'terms: two different forward passes are named {name!r}')
    decays = {t.ema_max_decay for t in self.terms} - {None}
    if len(decays) > 1:
      raise ValueError(f'terms: EMA copies with different decays {sorted(decays)}')
    if any(f.network == 'ema' for f in self.forwards) and not decays:
      raise ValueError('terms: a forward pass of the EMA copy, but no term keeps one')

  @property
  def forwards(self) -> tuple[Forward, ...]:
    """Every extra forward pass, once, in the order the terms ask for them."""
    return tuple(dict.fromkeys(f for t in self.terms for f in t.forwards))

  @property
  def groups(self) -> tuple[str, ...]:
    """The example groups besides ``'main'`` that the forward passes read."""
    return tuple(g for g in GROUPS[1:] if any(f.group == g for f in self.forwards))

  @property
  def ema_max_decay(self) -> float | None:
    return next((t.ema_max_decay for t in self.terms if t.ema_max_decay is not None), None)

  def carry_sharding(self) -> dict[str, str]:
    """Term name -> ``'replicated'`` or ``'batch'``."""
    return {t.name: t.carry_sharding for t in self.terms}

  @property
  def num_views(self) -> int:
    return max([t.num_views for t in self.terms], default=1)

  def views(self, images: jax.Array) -> jax.Array:
    """``[B * V, ...]`` images, example-major (the ``V`` views of example ``i`` are adjacent)."""
    viewer = next((t for t in self.terms if t.num_views > 1), None)
    if viewer is None:
      return images
    views = viewer.make_views(images)
    return views.reshape(-1, *views.shape[2:])

  def heads(self) -> dict[str, tuple[HeadRequest, ...]]:
    """Term name -> its head requests; head names must not collide."""
    heads = {t.name: t.heads() for t in self.terms}
    names = [h.name for hs in heads.values() for h in hs]
    if len(set(names)) != len(names):
      raise ConfigError(f'loss: two terms attach heads with the same name: {names}')
    return heads

  def init_rows(self, labels: jax.Array) -> dict[str, Any]:
    """Initial per-example tables of the stateful terms, by term name."""
    rows = {t.name: t.init_rows(labels) for t in self.terms}
    return {k: v for k, v in rows.items() if v is not None}

  def init_carry(self) -> dict[str, Any]:
    """Initial carry of every term (None for terms without one), by term name."""
    return {t.name: t.init_carry() for t in self.terms}

  def __call__(
      self,
      inputs: TermInputs,
      rows: Mapping[str, Any] | None = None,
      carry: Mapping[str, Any] | None = None,
  ) -> CombinedOutput:
    """Calls every term with its own rows, carry and PRNG key; sums weighted losses."""
    rows, carry = rows or {}, carry or {}
    total, per_term, new_rows, new_carry, metrics = 0.0, {}, {}, {}, {}
    for term in self.terms:
      own = inputs
      if inputs.key is not None:
        own = dataclasses.replace(
            inputs, key=jax.random.fold_in(inputs.key, zlib.crc32(term.name.encode()))
        )
      try:
        out = term(own, rows.get(term.name), carry.get(term.name))
      except KeyError as e:  # at trace time: an output the model does not return
        missing = e.args[0] if e.args else None
        if not isinstance(missing, str) or missing in inputs.outputs:
          raise
        raise ConfigError(
            f'loss.{term.name}: needs the model output {missing!r}, which this model does not '
            f'return (it returns logits and {", ".join(sorted(inputs.outputs)) or "nothing else"})'
        ) from None
      total = total + term.weight * out.loss
      per_term[term.name] = out.loss
      if out.rows is not None:
        new_rows[term.name] = out.rows
      new_carry[term.name] = out.carry
      metrics.update(out.metrics)
    return CombinedOutput(total, per_term, new_rows, new_carry, metrics)
