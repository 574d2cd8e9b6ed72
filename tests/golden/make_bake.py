"""Writes tests/golden/bake.npz: BAKE's loss and its gradient from the official code.

Runs the official PyTorch code of BAKE (Ge et al., 2021), https://github.com/yxgeee/BAKE at commit
07c4f668ea19311d5b50121026e73d2f035d5765 (the newest), from two files:

* ``small_scale/train.py`` (blob 08867562): ``KDLoss`` (L103-112), ``knowledge_ensemble``
  (L117-127) and the training loss ``CE + lamda * kdloss(outputs, kd_targets)`` (L143-150);
* ``imagenet/pycls/core/trainer.py`` (blob bb3853df): ``KDLoss`` (L84-93) and
  ``knowledge_ensemble`` (L95-122) with ``cross_gpus=False`` (one process: the all-gather of
  ``GLOBAL_KE`` is the identity).

Nothing of theirs is copied here: the script reads each file from a git directory of that
repository (a clone, or the bare mirror the ``fetch`` tool makes), checks its blob id, and
executes the text of just those top-level definitions (picked by name with ``ast``: the files'
other statements parse arguments, load data and build models). Stubs: ``torch``, ``nn`` and
the small-scale globals ``args`` (``temp``, ``omega``), ``use_cuda = False`` and
``softmax = nn.Softmax(dim=1)`` (L115); ``Tensor.cuda`` is the identity on a CPU-only PyTorch.
The training loss (``criterion`` = ``nn.CrossEntropyLoss()``, then ``loss += lamda * kd_loss``
with the targets from ``torch.no_grad()``) is the three statements of L143-150, restated.

Cases (fixed random logits, features and labels, float64 in PyTorch, so the reference is exact
for the float32 inputs saved): ``cifar``: B = 16 (4 classes x 4 images, the official M = 3
layout), C = 100, D = 32, T = 4, omega = 0.5, lambda = 1; ``tiny``: B = 8 (M = 1), C = 10,
D = 16, T = 4, omega = 0.9 (the official Tiny-ImageNet setting), lambda = 1.

Saved per case: logits, features, labels, the ensembled targets, the batch loss and the gradient
of that scalar with respect to the logits (the features get none: the targets are computed under
``no_grad`` from detached tensors), and the parameters.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_bake.py BAKE_GIT_DIR tests/golden/bake.npz
"""

import ast
import hashlib
import subprocess
import sys
import types

import numpy as np
import torch
from torch import nn

COMMIT = '07c4f668ea19311d5b50121026e73d2f035d5765'
SMALL = 'small_scale/train.py', '08867562e2e8cede5f0c9e7663302a1b470eb87e'
IMAGENET = 'imagenet/pycls/core/trainer.py', 'bb3853df97f60c81738a4d88803a288296abbeb2'
CASES = {
    'cifar': dict(classes=100, dim=32, per_class=4, groups=4, temp=4.0, omega=0.5, lamda=1.0),
    'tiny': dict(classes=10, dim=16, per_class=2, groups=4, temp=4.0, omega=0.9, lamda=1.0),
}


def _official(git_dir: str, file_blob: tuple[str, str], names: set[str], namespace: dict) -> dict:
  """The definitions ``names`` of a blob-checked file at ``COMMIT``, executed in ``namespace``."""
  path, blob = file_blob
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{COMMIT}:{path}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != blob:
    sys.exit(f'{path} at {COMMIT}: git blob {found}, expected {blob}')
  tree = ast.parse(data.decode())
  picked = [n for n in tree.body if getattr(n, 'name', None) in names]
  if {n.name for n in picked} != names:
    sys.exit(f'{path}: expected definitions {sorted(names)}')
  module = ast.Module(body=picked, type_ignores=[])
  exec(compile(module, f'{git_dir}:{COMMIT}:{path}', 'exec'), namespace)
  return namespace


def main(git_dir: str, out: str) -> None:
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch
  torch.set_default_dtype(torch.float64)  # torch.eye in knowledge_ensemble
  rng = np.random.default_rng(17)
  arrays = {}
  for name, case in CASES.items():
    args = types.SimpleNamespace(temp=case['temp'], omega=case['omega'])
    small = _official(
        git_dir,
        SMALL,
        {'KDLoss', 'knowledge_ensemble'},
        dict(torch=torch, nn=nn, args=args, use_cuda=False, softmax=nn.Softmax(dim=1)),
    )
    imagenet = _official(
        git_dir, IMAGENET, {'KDLoss', 'knowledge_ensemble'}, dict(torch=torch, nn=nn)
    )
    batch = case['per_class'] * case['groups']
    classes = rng.choice(case['classes'], case['groups'], replace=False)
    labels = np.repeat(classes, case['per_class'])
    logits = (rng.normal(size=(batch, case['classes'])) * 3.0).astype(np.float32)
    features = np.abs(rng.normal(size=(batch, case['dim']))).astype(np.float32)  # post-ReLU
    outputs = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    feats = torch.tensor(features, dtype=torch.float64)
    targets = torch.tensor(labels)
    loss = nn.CrossEntropyLoss()(outputs, targets)  # L143
    with torch.no_grad():  # L147-148
      kd_targets = small['knowledge_ensemble'](feats.detach(), outputs.detach())
    kd_loss = small['KDLoss'](case['temp'])(outputs, kd_targets.detach())  # L149
    loss = loss + case['lamda'] * kd_loss  # L150
    loss.backward()
    with torch.no_grad():
      other = imagenet['knowledge_ensemble'](
          feats, outputs, temp_factor=case['temp'], omega=case['omega'], cross_gpus=False
      )
      other_kd = imagenet['KDLoss'](case['temp'])(outputs, other)
    np.testing.assert_allclose(other.numpy(), kd_targets.numpy(), rtol=1e-12)
    np.testing.assert_allclose(other_kd.item(), kd_loss.item(), rtol=1e-12)
    arrays.update(
        {
            f'{name}_logits': logits,
            f'{name}_features': features,
            f'{name}_labels': labels.astype(np.int32),
            f'{name}_targets': kd_targets.numpy(),
            f'{name}_kd_loss': np.float64(kd_loss.item()),
            f'{name}_loss': np.float64(loss.item()),
            f'{name}_grad': outputs.grad.numpy(),
            f'{name}_temperature': np.float64(case['temp']),
            f'{name}_omega': np.float64(case['omega']),
            f'{name}_lamda': np.float64(case['lamda']),
        }
    )
  np.savez_compressed(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
