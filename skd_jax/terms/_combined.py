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

  Rows, carries and the terms' own parameters (and their optimizer states) are dicts keyed by
  term name. Forward passes of the same name are run once; EMA copies asked for by several terms
  must have the same decay.

  Views: any number of terms may add views of the main examples. The student's main pass sees
  ``V = 1 + sum_t (num_views_t - 1)`` views of every example: view 0 the original, then each
  viewing term's extra views in the order of ``terms`` (:meth:`view_slots`). Each term sees, in
  ``inputs.views``, view 0 and its own views only, in the order its ``make_views`` returned
  them, so a term's code does not depend on the other terms. Each term's ``make_views`` and
  ``__call__`` get the same key of the step (:meth:`term_key`).
  """

  terms: tuple[LossTerm, ...]

  def __post_init__(self):
    names = [t.name for t in self.terms]
    if len(set(names)) != len(names):
      raise ValueError(f'terms: names must be unique, got {names}')
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
    """``V``: the original and every term's extra views."""
    return 1 + sum(t.num_views - 1 for t in self.terms)

  def view_slots(self) -> dict[str, tuple[int, ...]]:
    """Term name -> the positions of its views among the ``V`` (``(0,)`` for a term without)."""
    slots, start = {}, 1
    for t in self.terms:
      slots[t.name] = (0,) + tuple(range(start, start + t.num_views - 1))
      start += t.num_views - 1
    return slots

  @staticmethod
  def term_key(key: jax.Array | None, term: LossTerm) -> jax.Array | None:
    """The term's own key of the step, from the step's key of all terms."""
    if key is None:
      return None
    return jax.random.fold_in(key, zlib.crc32(term.name.encode()))

  def views(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """``[B * V, ...]`` images, example-major (the ``V`` views of example ``i`` are adjacent).

    ``key`` is the step's key of all terms (the trainer's ``inputs.key``); every viewing term's
    ``make_views`` gets its :meth:`term_key`. The views are uint8 when every term's are, float32
    otherwise (in the uint8 pixel scale).
    """
    parts = [images[:, None]]
    for t in self.terms:
      if t.num_views > 1:
        made = t.make_views(images, self.term_key(key, t))
        if made.shape[:2] != (images.shape[0], t.num_views):
          raise ValueError(
              f'terms: {t.name}.make_views returned {made.shape[:2]}, expected '
              f'{(images.shape[0], t.num_views)} (examples, views)'
          )
        parts.append(made[:, 1:])
    if len(parts) == 1:
      return images
    if any(p.dtype != jnp.uint8 for p in parts):
      parts = [p.astype(jnp.float32) for p in parts]
    views = jnp.concatenate(parts, axis=1)
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
      ValueError: a term with parameters declares no optimizer or no objective.
    """
    params = {t.name: t.init_params(self.term_key(key, t)) for t in self.terms}
    params = {k: v for k, v in params.items() if v is not None}
    for term in self.terms:
      if term.name in params and term.optimizer() is None:
        raise ValueError(f'terms: {term.name} has parameters but no optimizer')
      if term.name in params and type(term).objective is LossTerm.objective:
        raise ValueError(f'terms: {term.name} has parameters but no objective')
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
      own = dataclasses.replace(inputs, key=self.term_key(inputs.key, term))
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
    """Calls every term with its own rows, carry, PRNG key, views and parameters; sums weighted
    losses.

    When ``inputs.views`` hold all ``V`` views (:attr:`num_views`, as in the trainer), each term
    sees view 0 and its own (:meth:`view_slots`); views laid out otherwise are passed as given. A
    term with parameters (a key of ``params``) receives them as ``params=``; they are constants
    here: the student's gradient never reaches them.
    """
    rows, carry, params = rows or {}, carry or {}, params or {}
    total, per_term, new_rows, new_carry, metrics = 0.0, {}, {}, {}, {}
    slots = self.view_slots()
    combined = next(iter(inputs.views.values())).shape[1] == self.num_views
    for term in self.terms:
      own = dataclasses.replace(inputs, key=self.term_key(inputs.key, term))
      if combined and slots[term.name] != tuple(range(self.num_views)):
        picked = jnp.asarray(slots[term.name])
        own = dataclasses.replace(own, views={k: v[:, picked] for k, v in inputs.views.items()})
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
