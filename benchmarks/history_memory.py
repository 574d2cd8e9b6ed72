r"""Memory of PS-KD's per-example history for each storage option, at CIFAR and ImageNet sizes.

The sizes come from the real structures: the term's ``init_rows`` is traced with
``jax.eval_shape`` on the padded number of rows (``skd_jax.example_rows.padded_rows``, a multiple
of the device count), and each table's shard on one device is its ``NamedSharding`` shard shape.
Nothing is allocated, so any size and device count can be shown on a laptop.

* per device: the bytes of every table's shard on one device (the tables are sharded along
  examples; nothing is replicated).
* per checkpoint: the bytes of the arrays a checkpoint stores (the whole tables, once),
  before any compression orbax may add; shown for 1 device (on D devices the tables have at
  most D - 1 more padding rows).

  python benchmarks/history_memory.py
  python benchmarks/history_memory.py --top_k=3,5,10 --devices=1,8,64,256

Units are decimal: 1 MB = 10^6 bytes, 1 GB = 10^9 bytes.
"""

import importlib.util
import os

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh
import numpy as np

from skd_jax import example_rows
from skd_jax import mesh as mesh_lib
from skd_jax.terms import pskd

# name -> (training examples, classes). ImageNet-1k: TFDS imagenet2012's train split.
# ImageNet-21k: the full Fall 2011 release as counted on image-net.org (14,197,122 images,
# 21,841 synsets); TFDS has no builder for it.
DATASETS = {
    'CIFAR-100': (50_000, 100),
    'ImageNet-1k': (1_281_167, 1_000),
    'ImageNet-21k': (14_197_122, 21_841),
}
GOAL = ('ImageNet-1k', 'top_k', 5, 50e6)  # dataset, storage, k, bytes in total

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _configured_top_k() -> int:
  path = os.path.join(_ROOT, 'configs', 'pskd.py')
  spec = importlib.util.spec_from_file_location('pskd_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return int(module.get_config().loss.pskd.top_k)


_TOP_K = flags.DEFINE_list('top_k', ['5'], "k of the top-k rows (configs/pskd.py's k is added).")
_DEVICES = flags.DEFINE_list('devices', ['1', '8', '256'], 'Device counts of the data mesh.')


def history_bytes(
    num_examples: int, num_classes: int, storage: str, top_k: int, devices: int
) -> tuple[int, int]:
  """``(per_device, per_checkpoint)`` bytes of the PS-KD history on a ``devices``-device mesh."""
  mesh = AbstractMesh((devices,), (mesh_lib.AXIS,))
  rows = example_rows.padded_rows(num_examples, mesh)
  term = pskd.PSKD(num_classes=num_classes, num_epochs=1, storage=storage, top_k=top_k)
  tables = jax.eval_shape(term.init_rows, jax.ShapeDtypeStruct((rows,), jnp.int32))
  sharding = mesh_lib.sharded(mesh)
  leaves = jax.tree.leaves(tables)
  per_device = sum(int(np.prod(sharding.shard_shape(t.shape))) * t.dtype.itemsize for t in leaves)
  return per_device, sum(t.size * t.dtype.itemsize for t in leaves)


def _human(num_bytes: float) -> str:
  for unit, scale in (('TB', 1e12), ('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if num_bytes >= scale:
      return f'{num_bytes / scale:.3g} {unit}'
  return f'{num_bytes:.0f} B'


def _options(top_ks):
  options = [('float32', 0), ('bfloat16', 0)]
  return options + [('top_k', k) for k in sorted(set(top_ks))]


def main(argv):
  del argv
  devices = [int(d) for d in _DEVICES.value]
  top_ks = [int(k) for k in _TOP_K.value] + [_configured_top_k()]
  header = f'{"dataset":<13} {"N x C":>20} {"storage":<10} {"checkpoint":>11}'
  header += ''.join(f' {f"{d} dev":>10}' for d in devices)
  print('PS-KD history: bytes per checkpoint, and per device on 1, 8 and 256 devices')
  print(header)
  print('-' * len(header))
  totals = {}
  for name, (n, c) in DATASETS.items():
    for storage, k in _options(top_ks):
      per_device = [history_bytes(n, c, storage, k, d)[0] for d in devices]
      total = history_bytes(n, c, storage, k, 1)[1]
      totals[name, storage, k] = total
      label = f'top-{k}' if storage == 'top_k' else storage
      line = f'{name:<13} {f"{n:,} x {c:,}":>20} {label:<10} {_human(total):>11}'
      print(line + ''.join(f' {_human(b):>10}' for b in per_device))
  name, storage, k, limit = GOAL
  total = totals.get((name, storage, k), history_bytes(*DATASETS[name], storage, k, 1)[1])
  verdict = 'met' if total <= limit else 'NOT met'
  print(f'Goal: {name} top-{k} <= {_human(limit)} in total: {_human(total)}, {verdict}.')


if __name__ == '__main__':
  app.run(main)
