"""Writes tests/golden/tfkd_reg.npz: TF-KD (reg)'s loss and its gradient from the official code.

Runs ``loss_kd_regularization`` of the official PyTorch code of TF-KD (Yuan et al., CVPR 2020),
https://github.com/yuanli2333/Teacher-free-Knowledge-Distillation at commit
d000ab378a409535a5f5f645b473e05e27529a02 (the commit METHODS.md names, also the newest), file
``my_loss_function.py`` (blob 88b793c8), lines 33-51. Nothing of theirs is copied here: the
script reads the file from a git directory of that repository (a clone, or the bare mirror the
``fetch`` tool makes), checks its blob id and executes its text.

The function calls ``.cuda()`` (L43); on a CPU-only PyTorch ``Tensor.cuda`` is replaced by the
identity for the run. Cases (fixed random logits and labels, float64 in PyTorch, so the reference
is exact for the float32 logits saved):

* ``r18``: the official ResNet-18 CIFAR-100 parameters (``experiments/base_experiments/
  base_resnet18/params.json``): ``reg_alpha = 0.1``, ``reg_temperature = 20``,
  ``multiplier = 100``; B = 16, C = 100, logits of scale 3;
* ``mnv2``: MobileNetV2's parameters (``base_mobilenetv2/params.json``): ``reg_alpha = 0.95``,
  ``reg_temperature = 40``, ``multiplier = 1``; B = 8, C = 10, logits of scale 5; and a
  ``correct_prob`` of 0.99 (hard-coded at L39).

Saved per case: logits, labels, the batch loss (the function's scalar) and the gradient of that
scalar with respect to the logits, and the parameters.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_tfkd_reg.py TFKD_GIT_DIR tests/golden/tfkd_reg.npz
"""

import hashlib
import subprocess
import sys
import types

import numpy as np
import torch

COMMIT = 'd000ab378a409535a5f5f645b473e05e27529a02'
FILE, BLOB = 'my_loss_function.py', '88b793c85c1fabb69ad53e2d9775b6d6e0bd0518'
CASES = {
    'r18': dict(
        batch=16, classes=100, scale=3.0, reg_alpha=0.1, reg_temperature=20.0, multiplier=100.0
    ),
    'mnv2': dict(
        batch=8, classes=10, scale=5.0, reg_alpha=0.95, reg_temperature=40.0, multiplier=1.0
    ),
}


def _official_module(git_dir: str) -> types.ModuleType:
  """``my_loss_function.py`` at ``COMMIT``, checked by its blob id and executed as a module."""
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{COMMIT}:{FILE}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != BLOB:
    sys.exit(f'{FILE} at {COMMIT}: git blob {found}, expected {BLOB}')
  module = types.ModuleType('my_loss_function')
  exec(compile(data, f'{git_dir}:{COMMIT}:{FILE}', 'exec'), module.__dict__)
  return module


def main(git_dir: str, out: str) -> None:
  official = _official_module(git_dir)
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch (L43)
  rng = np.random.default_rng(17)
  arrays = {'correct_prob': np.float64(0.99)}
  for name, case in CASES.items():
    logits = (rng.normal(size=(case['batch'], case['classes'])) * case['scale']).astype(np.float32)
    labels = rng.integers(0, case['classes'], case['batch'])
    z = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    params = types.SimpleNamespace(
        reg_alpha=case['reg_alpha'],
        reg_temperature=case['reg_temperature'],
        multiplier=case['multiplier'],
    )
    loss = official.loss_kd_regularization(z, torch.tensor(labels), params)
    loss.backward()
    arrays.update(
        {
            f'{name}_logits': logits,
            f'{name}_labels': labels.astype(np.int32),
            f'{name}_loss': np.float64(loss.item()),
            f'{name}_grad': z.grad.numpy(),
            f'{name}_alpha': np.float64(case['reg_alpha']),
            f'{name}_temperature': np.float64(case['reg_temperature']),
            f'{name}_multiplier': np.float64(case['multiplier']),
        }
    )
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
