"""A weighted sum of loss terms: what the trainer calls (see ``skd_jax.terms``)."""

import dataclasses
from typing import Any, Mapping, NamedTuple
import zlib

import jax
import jax.numpy as jnp
import optax

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

  Rows, carries and the terms' own parameters (and their optimizer states) are dicts keyed by term
  name. At most one term may add views of the batch;
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

  def init_params(self, key: jax.Array) -> dict[str, Any]:
    """Initial parameters of the terms that train their own, by term name.

    Each term gets ``fold_in(key, crc32(name))``, so adding a term changes no other's draws.

    Raises:
      ValueError: a term with parameters declares no optimizer.
    """
    params = {t.name: t.init_params(_own_key(key, t.name)) for t in self.terms}
    params = {k: v for k, v in params.items() if v is not None}
    for term in self.terms:
      if term.name in params and term.optimizer() is None:
        raise ValueError(f'terms: {term.name} has parameters but no optimizer')
    return params

  def init_opt_state(self, params: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer state of every term's parameters (``init_params``' result), by term name."""
    return {t.name: t.optimizer().init(params[t.name]) for t in self.terms if t.name in params}

  def update_params(
      self, params: Mapping[str, Any], opt_state: Mapping[str, Any], inputs: TermInputs
  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, jax.Array]]:
    """One optimizer step of every term's parameters on its objective.

    The objective is ``term.objective(params, inputs)`` averaged over the batch's real examples
    (``inputs.valid``); only the term's parameters are differentiated (``inputs`` should be under
    ``stop_gradient``). Each term sees its own PRNG key, the one its ``__call__`` saw.

    Returns:
      The new parameters and optimizer states, and ``objective/<term>``: each objective's value
      at the parameters before the update.
    """
    weights = inputs.valid.astype(jnp.float32) / jnp.sum(inputs.valid)
    new_params, new_opt_state, measured = dict(params), dict(opt_state), {}
    for term in self.terms:
      if term.name not in params:
        continue
      own = _with_own_key(inputs, term.name)
      objective = lambda p, term=term, own=own: jnp.sum(weights * term.objective(p, own))
      value, grads = jax.value_and_grad(objective)(params[term.name])
      updates, new_opt_state[term.name] = term.optimizer().update(
          grads, opt_state[term.name], params[term.name]
      )
      new_params[term.name] = optax.apply_updates(params[term.name], updates)
      measured[f'objective/{term.name}'] = value
    return new_params, new_opt_state, measured

  def __call__(
      self,
      inputs: TermInputs,
      rows: Mapping[str, Any] | None = None,
      carry: Mapping[str, Any] | None = None,
      params: Mapping[str, Any] | None = None,
  ) -> CombinedOutput:
    """Calls every term with its own rows, carry, PRNG key and parameters; sums weighted losses.

    A term with parameters (a key of ``params``) receives them as ``params=``; they are
    constants here: the student's gradient never reaches them.
    """
    rows, carry, params = rows or {}, carry or {}, params or {}
    total, per_term, new_rows, new_carry, metrics = 0.0, {}, {}, {}, {}
    for term in self.terms:
      own = _with_own_key(inputs, term.name)
      extra = {'params': params[term.name]} if term.name in params else {}
      try:
        out = term(own, rows.get(term.name), carry.get(term.name), **extra)
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


def _own_key(key: jax.Array, name: str) -> jax.Array:
  return jax.random.fold_in(key, zlib.crc32(name.encode()))


def _with_own_key(inputs: TermInputs, name: str) -> TermInputs:
  """``inputs`` with the term's own PRNG key (unchanged without a key)."""
  if inputs.key is None:
    return inputs
  return dataclasses.replace(inputs, key=_own_key(inputs.key, name))
