"""Writes tests/golden/dks.npz: DKS's loss and gradients by Self-KD-Lib's and the authors' code.

Two references, both executed as they are (each file checked against its git blob id; nothing of
theirs is copied here):

* ``self_kd_lib``: ``DKS`` of https://github.com/winycg/Self-KD-Lib at commit
  ede3062d1193626da2bc8a1ceba535d84fb0a08c, file ``methods/dks.py`` (git blob da43dc87, lines
  13-28), with ``DistillKL`` of ``utils.py`` (git blob 4b6a5edc, lines 101-112: a batchmean KL at
  temperature T, times T^2) and ``nn.CrossEntropyLoss()``, as ``main.py`` builds them (L312-313,
  ``--T`` default 4) and adds them (L235: ``loss = loss_cls + loss_div``). ``net(inputs)``
  returns fixed leaf tensors in the layout of its ``CIFAR_ResNet`` with branches
  (``models/resnet.py`` L212): ``[out, x1, x2]``, the final classifier, the branch on stage 3 and
  the branch on stage 2.
* ``authors``: ``KL_divergence`` of https://github.com/sundw2014/DKS at commit
  285354171eb2dc2aea19436bed9517096308f915, file ``wrn_DKS/KL_divergence.py`` (git blob 6a168e79;
  T = 1, probabilities smoothed by 1e-8), combined as ``wrn_DKS/main.py`` (git blob 14438e94)
  combines the outputs in lines 142-148 of its ``h``: that loop lives inside a training closure
  that cannot be called alone, so the lines are read from the checked file and executed here on
  the same leaf tensors, in its output order ``(ep1_o, ep2_o, o)`` (branch on stage 1, branch on
  stage 2, final classifier).

Stubs: ``torch.Tensor.cuda`` returns the tensor itself (CPU-only PyTorch). Float64 throughout
(``torch.set_default_dtype``) on float32-representable inputs, B = 8, C = 10. Saved: the logits
``z0`` (final), ``z1``, ``z2`` (branches), labels, and for each reference ``<ref>_loss`` (the
scalar loss) and ``<ref>_g_z0`` .. ``<ref>_g_z2`` (its gradients), and T.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_dks.py SELF_KD_LIB_GIT_DIR DKS_GIT_DIR tests/golden/dks.npz
"""

import hashlib
import subprocess
import sys
import textwrap
import types

import numpy as np
import torch
import torch.nn.functional as F

SELF_KD_LIB = (
    'ede3062d1193626da2bc8a1ceba535d84fb0a08c',
    {
        'methods/dks.py': 'da43dc871510ce90e2e6b81c74b334c64e7fd2dc',
        'utils.py': '4b6a5edc676ef72f3cd4934e9d0e07facae16936',
    },
)
AUTHORS = (
    '285354171eb2dc2aea19436bed9517096308f915',
    {
        'wrn_DKS/KL_divergence.py': '6a168e79278456beeee43d11e9106761fc15d0c4',
        'wrn_DKS/main.py': '14438e943c90bdd860061361d139d0d97e6bc3f1',
    },
)
BATCH, CLASSES, T = 8, 10, 4.0


def _source(git_dir: str, repo, path: str) -> bytes:
  """``path`` at the repository's commit, checked by its blob id."""
  commit, blobs = repo
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{commit}:{path}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != blobs[path]:
    sys.exit(f'{path} at {commit}: git blob {found}, expected {blobs[path]}')
  return data


def _module(git_dir: str, repo, path: str) -> types.ModuleType:
  module = types.ModuleType(path)
  exec(compile(_source(git_dir, repo, path), f'{git_dir}:{path}', 'exec'), module.__dict__)
  return module


def _authors_loss(git_dir: str, outputs, targets):
  """Lines 142-148 of the authors' ``wrn_DKS/main.py`` executed on ``outputs`` and ``targets``."""
  lines = _source(git_dir, AUTHORS, 'wrn_DKS/main.py').decode().splitlines()[141:148]
  code = textwrap.dedent('\n'.join(lines))
  assert code.startswith('_loss = []') and code.endswith('loss = sum(_loss)'), code
  kl = _module(git_dir, AUTHORS, 'wrn_DKS/KL_divergence.py').KL_divergence
  scope = {'_outputs': outputs, 'targets': targets, 'F': F, 'KL_divergence': kl}
  exec(compile(code, f'{git_dir}:wrn_DKS/main.py:142-148', 'exec'), scope)
  return scope['loss']


def main(self_kd_lib_dir: str, dks_dir: str, out: str) -> None:
  torch.set_default_dtype(torch.float64)
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch
  dks = _module(self_kd_lib_dir, SELF_KD_LIB, 'methods/dks.py')
  utils = _module(self_kd_lib_dir, SELF_KD_LIB, 'utils.py')
  rng = np.random.default_rng(19)
  arrays = {'z0': 3 * rng.normal(size=(BATCH, CLASSES))}
  arrays['z1'] = arrays['z0'] + 2 * rng.normal(size=(BATCH, CLASSES))
  arrays['z2'] = 3 * rng.normal(size=(BATCH, CLASSES))
  # Float32-representable inputs, so the float64 reference is exact for what JAX sees.
  arrays = {k: v.astype(np.float32).astype(np.float64) for k, v in arrays.items()}
  labels = rng.integers(0, CLASSES, BATCH)
  targets = torch.tensor(labels)

  def run(loss_fn):
    leaves = {k: torch.tensor(arrays[k], requires_grad=True) for k in ('z0', 'z1', 'z2')}
    loss = loss_fn(leaves)
    loss.backward()
    return float(loss.item()), {k: v.grad.numpy() for k, v in leaves.items()}

  def self_kd_lib(leaves):
    net = lambda inputs: [leaves['z0'], leaves['z1'], leaves['z2']]
    _, loss_cls, loss_div = dks.DKS(
        net, None, targets, torch.nn.CrossEntropyLoss(), utils.DistillKL(T)
    )
    return loss_cls + loss_div

  def authors(leaves):
    # Its order: the shallower branch, the deeper one, the final classifier (the loss is a sum
    # over all classifiers and all ordered pairs, so the order changes only the rounding).
    return _authors_loss(dks_dir, [leaves['z2'], leaves['z1'], leaves['z0']], targets)

  saved = dict(arrays, labels=labels.astype(np.int32), temperature=T)
  for name, fn in (('self_kd_lib', self_kd_lib), ('authors', authors)):
    loss, grads = run(fn)
    saved[f'{name}_loss'] = np.float64(loss)
    saved.update({f'{name}_g_{k}': g for k, g in grads.items()})
  np.savez(out, **saved)


if __name__ == '__main__':
  main(*sys.argv[1:])
