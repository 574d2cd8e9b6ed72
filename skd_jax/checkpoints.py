"""Checkpoints that never restore silently corrupted state and never fail silently.

A checkpoint is an orbax step directory with two items: ``state`` (the whole train state) and
``meta`` (JSON: a fingerprint of the state and what the trainer needs besides it, such as the
measurements of the steps not logged yet).

* **Fingerprint.** Before each save every array of the state is reduced on its devices to a 32-bit
  checksum (a sum of its bits times odd, position-dependent weights, in wrapping uint32
  arithmetic, so it is exact and independent of the sharding), and every floating-point array is
  checked to be finite. A non-finite state is never saved. On restore the checksums are
  recomputed: any change to one element (a flipped bit, wherever it lies) gives a different
  checksum; a truncated or rewritten data file gives one too, or orbax fails to read it.
* **Fall back.** :meth:`Checkpoints.restore` tries the checkpoints newest first and returns the
  first that restores and matches its fingerprint. Each one skipped is logged in one line with
  the reason and moved aside into ``broken_directory`` (never deleted), so it can be inspected and
  orbax no longer sees it.
* **Damaged or not this run's.** Before reading any array, the tree, shapes and dtypes recorded in
  a checkpoint's metadata are compared with the state to restore. Metadata that cannot be read
  counts as damage (moved aside); a state that does not fit (a history of another size, a term
  added) is refused with a ConfigError and the checkpoint stays where it is: it is intact, the
  run asking for it is another.
* **Failed saves.** Saves are asynchronous. :meth:`Checkpoints.poll`, called every step, notices
  a save that finished with an error (a full disk, say) at once and raises :class:`SaveError`
  with one line naming the path and the cause. Orbax removes nothing: the last committed
  checkpoint stays intact, and the failed attempt's temporary directory is cleaned up by the next
  run.
"""

import functools
import logging
import os
import re
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import orbax.checkpoint as ocp

from skd_jax.errors import ConfigError, SaveError, first_line

log = logging.getLogger(__name__)


def _bits(x: jax.Array) -> jax.Array:
  """The array's raw bits as uint32 values, one per element."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


FINGERPRINT_VERSION = 2
"""The checksum :func:`fingerprint` computes. Version 1 (records written before version 2, a flat
``{leaf: checksum}`` object) weighted element ``i`` by ``i * g + 1``, which is even at odd ``i``:
where that weight is a multiple of ``2^k``, a change of the element's bits by a multiple of
``2^(32 - k)`` (a flipped sign bit, at every odd ``i``) vanished modulo ``2^32``. Such records are
still verified as they were written."""

_GOLDEN = 0x9E3779B1  # 2^32 / golden ratio: consecutive weights far apart


def _checksum(x: jax.Array, version: int) -> jax.Array:
  bits = _bits(x).reshape(-1)
  i = jnp.arange(bits.size, dtype=jnp.uint32)
  if version == 1:
    weights = i * jnp.uint32(_GOLDEN) + jnp.uint32(1)
  else:
    # Odd weights are invertible modulo 2^32, so any change to a single element changes the sum;
    # distinct weights make two swapped elements visible too, unless their bits differ by a
    # multiple of a large power of two (only a sign bit, say).
    weights = i * jnp.uint32((2 * _GOLDEN) % 2**32) + jnp.uint32(1)
  return jnp.sum(bits * weights, dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.array(True)


@functools.partial(jax.jit, static_argnums=1)
def _summaries(tree, version):
  return jax.tree.map(lambda x: _checksum(x, version), tree), jax.tree.map(_finite, tree)


def _checksums(tree, version: int) -> tuple[dict[str, int], list[str]]:
  """Leaf path -> uint32 checksum, and the paths of non-finite floating-point leaves."""
  checksums, finite = jax.device_get(_summaries(tree, version))
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator='/')
  return (
      {name(p): int(c) for p, c in jax.tree_util.tree_leaves_with_path(checksums)},
      [name(p) for p, ok in jax.tree_util.tree_leaves_with_path(finite) if not ok],
  )


def fingerprint(tree) -> tuple[dict[str, Any], list[str]]:
  """The record to save with ``tree`` (JSON: ``{'version': FINGERPRINT_VERSION, 'checksums':
  {leaf path: uint32}}``) and the paths of its non-finite floating-point leaves."""
  checksums, non_finite = _checksums(tree, FINGERPRINT_VERSION)
  return {'version': FINGERPRINT_VERSION, 'checksums': checksums}, non_finite


def verify(tree, saved) -> str | None:
  """Why ``tree`` does not match ``saved``, the :func:`fingerprint` recorded with it (e.g. ``'does
  not match its fingerprint in params/head/kernel'``); None when it matches."""
  if isinstance(saved, dict) and set(saved) == {'version', 'checksums'}:
    version, expected = saved['version'], saved['checksums']
  else:
    version, expected = 1, saved  # written before fingerprints had versions
  if not isinstance(expected, dict):
    return 'has no fingerprint'
  if version not in (1, FINGERPRINT_VERSION):
    return f'has a fingerprint of version {version!r:.20}, which is not one this skd_jax knows'
  checksums, non_finite = _checksums(tree, version)
  if non_finite:
    return f'holds non-finite values in {non_finite[0]}'
  differ = [name for name in checksums if expected.get(name) != checksums[name]]
  if differ or set(expected) != set(checksums):
    where = differ[0] if differ else 'its structure'
    more = f' and {len(differ) - 1} more arrays' if len(differ) > 1 else ''
    return f'does not match its fingerprint in {where}{more}'
  return None


def _cause(error: BaseException) -> str:
  """The root cause of an orbax/tensorstore error, e.g. ``No space left on device (errno 28)``.

  Tensorstore appends ``[os_error_code=N]`` to an OS error, but where the OS's words stand in
  the text depends on the write that failed (a chunk, a manifest, a JSON spec), so the words are
  taken from the code.
  """
  text = first_line(error) or type(error).__name__
  os_error = re.search(r"\[os_error_code='?(\d+)'?\]", text)
  if os_error:
    code = int(os_error.group(1))
    return f'{os.strerror(code)} (errno {code})'
  return text if len(text) <= 400 else text[:397] + '...'  # with a workdir's long paths


def read_error(error: BaseException) -> str:
  """Why an orbax read failed, in words: the innermost error of the chain a traceback would show
  (orbax wraps tensorstore's error, which names the file and the byte range, in one that prints a
  whole tensorstore spec; a JSON decoder's error hides the internals it was raised from)."""
  while True:
    inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    if inner is None:
      return _cause(error)
    error = inner


# The layout of a node without arrays (None, {}, an empty tuple, optax's EmptyState).
_EMPTY = 'empty'


def _layout(tree) -> dict[str, str]:
  """Leaf path -> ``dtype[shape]`` of a state or of its orbax metadata, as orbax stores the tree.

  Nodes without arrays count (as ``'empty'``): orbax restores only onto the tree it saved, empty
  nodes included, so a term that keeps no state (its carry is None) changes the tree too.
  """
  flat = ocp.tree.to_flat_dict(
      ocp.tree.serialize_tree(tree, keep_empty_nodes=True), keep_empty_nodes=True
  )
  return {
      '/'.join(map(str, path)): (
          f'{leaf.dtype}{list(leaf.shape)}' if jax.tree_util.all_leaves([leaf]) else _EMPTY
      )
      for path, leaf in flat.items()
  }


def _misfit(saved: dict[str, str], wanted: dict[str, str]) -> str | None:
  """The first difference between two :func:`_layout` results, in words; None if they agree."""
  for name in sorted(saved.keys() | wanted.keys()):
    if name not in wanted:
      return f'it holds {name}, which this run has not'
    if name not in saved:
      return f'it lacks {name} ({wanted[name]} here)'
    if saved[name] != wanted[name]:
      return f'{name} is {saved[name]} there and {wanted[name]} here'
  return None


def _restore_target(saved_tree, abstract_state) -> tuple[Any, list[str]]:
  """What to restore a checkpoint onto, and the state's fields it lacks.

  A checkpoint saved before a field of the state was added (``term_params``, say) lacks that
  field; where the field is empty in this run (an empty dict, no array), the checkpoint is
  restored without it and the field is added back empty. The :func:`_misfit` check leaves these
  fields out; any other difference of the tree, empty nodes included, does not fit.
  """
  wanted = ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True)
  if not isinstance(wanted, dict) or not hasattr(saved_tree, 'keys'):
    return abstract_state, []
  missing = [k for k, v in wanted.items() if k not in saved_tree and isinstance(v, dict) and not v]
  if not missing:
    return abstract_state, []
  return {k: v for k, v in wanted.items() if k not in missing}, missing


class Checkpoints:
  """The checkpoints of one run (see the module docstring)."""

  def __init__(self, directory: epath.PathLike, broken_directory: epath.PathLike, *, keep: int):
    self.directory = epath.Path(directory)
    self.broken_directory = epath.Path(broken_directory)
    self._manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, cleanup_tmp_directories=True, create=True
        ),
    )
    self._saving = None  # the step of a save that may still be running
    self._metadata = ocp.StandardCheckpointHandler()  # reads a state's tree, shapes and dtypes

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts saving ``state`` with ``meta`` at ``step``; refuses a non-finite state.

    Raises:
      FloatingPointError: a floating-point array of ``state`` is not finite.
      SaveError: the previous save failed.
    """
    record, non_finite = fingerprint(state)
    if non_finite:
      raise FloatingPointError(f'non-finite values in {non_finite[0]} at step {step}')
    self.finish()
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({**meta, 'fingerprint': record}),
        ),
        force=True,
    )
    self._saving = step

  def poll(self) -> None:
    """Raises :class:`SaveError` if a save finished with an error; never blocks on a running one."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.finish()

  def finish(self) -> None:
    """Waits for a running save; raises :class:`SaveError` if it failed."""
    if self._saving is None:
      return
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # orbax and tensorstore fail with many types  # pylint: disable=broad-except
      raise SaveError(
          f'checkpoint: saving step {step} to {self.directory / str(step)} failed: ' f'{_cause(e)}'
      ) from e

  def restore(self, abstract_state) -> tuple[int, Any, dict[str, Any]] | None:
    """The newest checkpoint that restores and matches its fingerprint: ``(step, state, meta)``.

    ``abstract_state`` gives the shapes, dtypes and shardings to restore onto. Broken checkpoints
    are moved aside (see the module docstring). Returns None when no checkpoint is usable.

    Raises:
      ConfigError: the newest checkpoint that is not damaged holds a state of another tree,
        shape or dtype than ``abstract_state``; it is left in place.
    """
    wanted = _layout(abstract_state)
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        saved_tree = self._metadata.metadata(self.directory / str(step) / 'state').tree
        saved = _layout(saved_tree)
      except Exception as e:  # pylint: disable=broad-except
        self._move_aside(step, f'has no readable metadata ({read_error(e)})')
        continue
      target, missing = _restore_target(saved_tree, abstract_state)
      misfit = _misfit(saved, {k: v for k, v in wanted.items() if k not in missing})
      if misfit:
        raise ConfigError(
            f'checkpoint: {self.directory / str(step)} does not fit this run: {misfit}; it was '
            'saved with another config, training set or number of devices; resume as it was '
            'saved or use a new --workdir'
        )
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state = restored.state
        if missing:
          state = ocp.tree.deserialize_tree(
              {**state, **{k: {} for k in missing}}, abstract_state, keep_empty_nodes=True
          )
      except Exception as e:  # pylint: disable=broad-except
        reason = f'does not restore ({read_error(e)})'
      else:
        reason = verify(state, (restored.meta or {}).get('fingerprint'))
      if reason is None:
        meta = dict(restored.meta)
        meta.pop('fingerprint')
        return step, state, meta
      self._move_aside(step, reason)
    return None

  def _move_aside(self, step: int, reason: str) -> None:
    source = self.directory / str(step)
    target = self.broken_directory / str(step)
    if jax.process_index() == 0:
      self.broken_directory.mkdir(parents=True, exist_ok=True)
      suffix = 1
      while target.exists():
        suffix += 1
        target = self.broken_directory / f'{step}.{suffix}'
      # In a bucket a folder exists only through its objects, and epath renames only into an
      # existing folder: an empty object stands for it during the first move.
      marker = None if self.broken_directory.exists() else self.broken_directory / '.folder'
      if marker:
        marker.write_text('')
      source.rename(target)
      if marker:
        marker.unlink()
    multihost_utils.sync_global_devices(f'skd_jax: checkpoint {step} moved aside')
    self._manager.reload()
    log.warning('Skipped the checkpoint at step %d: it %s; moved it to %s.', step, reason, target)

  def close(self) -> None:
    """Waits for a running save and releases orbax's threads; raises :class:`SaveError`."""
    try:
      self.finish()
    finally:
      self._metadata.close()
      self._manager.close()
