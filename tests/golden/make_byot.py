"""Writes tests/golden/byot.npz: Self-KD-Lib's BYOT loss and its gradients.

There is no official BYOT code; the reference is ``BYOT`` of https://github.com/winycg/Self-KD-Lib
at commit ede3062d1193626da2bc8a1ceba535d84fb0a08c, file ``methods/byot.py`` (git blob 175fb204,
lines 13-28), with its distillation criterion ``DistillKL`` of ``utils.py`` (git blob 4b6a5edc,
lines 101-112: a batchmean KL at temperature T, times T^2) and ``nn.CrossEntropyLoss()``, as
``main.py`` builds them (L312-313, ``--T`` default 4) and adds them (L235:
``loss = loss_cls + loss_div``). Both files are checked against their blob ids and executed as they
are. Nothing of theirs is copied here. Stubs:

* ``torch.Tensor.cuda`` returns the tensor itself (byot.py L14-15);
* ``net(inputs, feature=True)`` returns fixed leaf tensors in the layout of Self-KD-Lib's
  ``CIFAR_ResNet`` with branches (``models/resnet.py`` L209-210): logits ``[out, x1, x2]`` (the
  final classifier, the head on stage 3, the head on stage 2) and features
  ``[embedding0, f0, f1, f2]`` (f0 the final feature, f1 and f2 the heads'). Self-KD-Lib's f's are
  4x4 feature maps; here they are ``[B, D]`` vectors, our pooled features: its ``.mean()`` over
  every element is then the batch mean of our per-example mean over D.

Float64 throughout (``torch.set_default_dtype``) on float32-representable inputs, B = 8, C = 10, D = 6. Saved: the logits
``z0, z1, z2``, features ``f0, f1, f2``, labels, the scalar ``loss_cls + loss_div`` and its
gradients with respect to every input (``g_z0`` .. ``g_f2``; ``g_f0`` is zero: the teacher's
feature is detached), and T.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_byot.py SELF_KD_LIB_GIT_DIR tests/golden/byot.npz
"""

import hashlib
import subprocess
import sys
import types

import numpy as np
import torch

COMMIT = 'ede3062d1193626da2bc8a1ceba535d84fb0a08c'
FILES = {
    'methods/byot.py': '175fb20439d3f1d8eab89e91557c6d1e7d2e3b62',
    'utils.py': '4b6a5edc676ef72f3cd4934e9d0e07facae16936',
}
BATCH, CLASSES, DIM, T = 8, 10, 6, 4.0


def _module(git_dir: str, path: str) -> types.ModuleType:
  """``path`` at ``COMMIT``, checked by its blob id and executed as a module."""
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{COMMIT}:{path}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != FILES[path]:
    sys.exit(f'{path} at {COMMIT}: git blob {found}, expected {FILES[path]}')
  module = types.ModuleType(path)
  exec(compile(data, f'{git_dir}:{COMMIT}:{path}', 'exec'), module.__dict__)
  return module


def main(git_dir: str, out: str) -> None:
  torch.set_default_dtype(torch.float64)
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch (byot.py L14-15)
  byot, utils = _module(git_dir, 'methods/byot.py'), _module(git_dir, 'utils.py')
  rng = np.random.default_rng(17)
  arrays = {'z0': 3 * rng.normal(size=(BATCH, CLASSES))}
  arrays['z1'] = arrays['z0'] + 2 * rng.normal(size=(BATCH, CLASSES))
  arrays['z2'] = 3 * rng.normal(size=(BATCH, CLASSES))
  for name in ('f0', 'f1', 'f2'):
    arrays[name] = rng.normal(size=(BATCH, DIM))
  # Float32-representable inputs, so the float64 reference is exact for what JAX sees.
  arrays = {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}
  labels = rng.integers(0, CLASSES, BATCH)
  leaves = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
  embedding = leaves['f0'] * 1.0  # features[0] is unused by BYOT

  def net(inputs, feature=False):
    assert feature
    logits = [leaves['z0'], leaves['z1'], leaves['z2']]
    return logits, [embedding, leaves['f0'], leaves['f1'], leaves['f2']]

  _, loss_cls, loss_div = byot.BYOT(
      net, None, torch.tensor(labels), torch.nn.CrossEntropyLoss(), utils.DistillKL(T)
  )
  loss = loss_cls + loss_div
  loss.backward()
  # f0 reaches the loss only detached: no gradient (None), saved as zeros.
  grads = {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()}
  arrays.update({f'g_{k}': g.numpy() for k, g in grads.items()})
  arrays.update(labels=labels.astype(np.int32), loss=np.float64(loss.item()), temperature=T)
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
