"""Writes tests/golden/ddgsd.npz: DDGSD's loss and gradients from two reference implementations.

There is no official code of DDGSD (Xu & Liu, AAAI 2019). Two re-implementations are run:

* yechanp/self_kd, https://github.com/yechanp/self_kd at commit
  9abb7e5d003d435c52b4cfee346913ca6e8d212f, ``models/methods.py`` (blob fae80d03):
  ``kl_div_loss`` (L40-50), ``make_feature_vector`` (L52-63), ``BaseMethod`` and ``DDGSD``
  (L289-323), whose ``calculate_loss`` returns ``loss_total = CE1 + CE2 + lam_kd * 9 (KL1 + KL2)
  + 0.005 * MMD`` (``lam_kd`` 1, the default of its ``main.py``);
* winycg/Self-KD-Lib, https://github.com/winycg/Self-KD-Lib at commit
  ede3062d1193626da2bc8a1ceba535d84fb0a08c, ``methods/ddsgd.py`` (blob da6ca066): ``DDGSD``,
  with ``criterion_div = DistillKL(args.T)`` from ``utils.py`` (blob 4b6a5edc, L101-112; ``--T``
  defaults to 4) and ``criterion_cls = nn.CrossEntropyLoss()``, the training loss
  ``loss_cls + loss_div`` of ``main.py`` (L207-235).

Nothing of theirs is copied here: the script reads each file from a git directory of that
repository (a clone, or the bare mirror the ``fetch`` tool makes), checks its blob id, and
executes the text of just those top-level definitions (picked by name with ``ast``). Stubs:
the network is a module whose output is the saved logits and features themselves (parameters,
so their gradients are read off), for yechanp a ``[2B, D, 1, 1]`` feature map (its global
pooling is then the identity); ``Tensor.cuda`` is the identity on a CPU-only PyTorch; yechanp's
``BaseMethod.set_optimizer`` gets ``MultipleOptimizer`` / ``MultipleSchedulers`` stand-ins (the
optimizer is never stepped).

Each case: the first view is rows ``[0, B)``, the second ``[B, 2B)`` of ``logits`` ``[2B, C]``
and ``features`` ``[2B, D]`` (random, float32, computed in float64 so the reference is exact
for the inputs saved); ``labels`` ``[B]``; the scalar training loss and its gradients with
respect to the logits and the features. ``yechanp``: B = 8, C = 10, D = 16; ``selfkd_lib``: the
same sizes, other draws.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_ddgsd.py YECHANP_GIT_DIR SELFKD_LIB_GIT_DIR tests/golden/ddgsd.npz
"""

import ast
import hashlib
import subprocess
import sys
import types
import typing

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

YECHANP = '9abb7e5d003d435c52b4cfee346913ca6e8d212f'
YECHANP_FILE = 'models/methods.py', 'fae80d03600a4352e7217b343e96f23835edef2b'
SELFKD_LIB = 'ede3062d1193626da2bc8a1ceba535d84fb0a08c'
SELFKD_FILE = 'methods/ddsgd.py', 'da6ca0662b3687ea35818415ad96fb874e43e243'
SELFKD_UTILS = 'utils.py', '4b6a5edc676ef72f3cd4934e9d0e07facae16936'
BATCH, CLASSES, DIM = 8, 10, 16


def _official(git_dir, commit, file_blob, names, namespace):
  """The definitions ``names`` of a blob-checked file at ``commit``, executed in ``namespace``."""
  path, blob = file_blob
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{commit}:{path}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != blob:
    sys.exit(f'{path} at {commit}: git blob {found}, expected {blob}')
  tree = ast.parse(data.decode())
  picked = [n for n in tree.body if getattr(n, 'name', None) in names]
  if {n.name for n in picked} != names:
    sys.exit(f'{path}: expected definitions {sorted(names)}')
  module = ast.Module(body=picked, type_ignores=[])
  exec(compile(module, f'{git_dir}:{commit}:{path}', 'exec'), namespace)
  return namespace


class _Outputs(nn.Module):
  """A stand-in network: returns its parameters, the given logits and features."""

  def __init__(self, logits, features):
    super().__init__()
    self.logits = nn.Parameter(torch.tensor(logits, dtype=torch.float64))
    self.features = nn.Parameter(torch.tensor(features, dtype=torch.float64))

  def forward(self, x, return_feat=False, embedding=False):
    del x
    if return_feat:  # yechanp: the list of stage maps, the last one pooled by the method
      return self.logits, [self.features[:, :, None, None]]
    assert embedding  # Self-KD-Lib: net(inputs, embedding=True)
    return self.logits, self.features


def _draw(rng):
  logits = (rng.normal(size=(2 * BATCH, CLASSES)) * 3.0).astype(np.float32)
  features = np.abs(rng.normal(size=(2 * BATCH, DIM))).astype(np.float32)  # post-ReLU
  labels = rng.integers(0, CLASSES, BATCH)
  return logits, features, labels


def _yechanp(git_dir, logits, features, labels):
  namespace = dict(
      torch=torch,
      nn=nn,
      F=F,
      Tensor=torch.Tensor,
      Module=nn.Module,
      Dict=typing.Dict,
      List=typing.List,
      Any=typing.Any,
      Tuple=typing.Tuple,
      Config=object,
      AverageMeter=None,
      ProgressMeter=None,
      MultipleOptimizer=lambda optimizers: optimizers,
      MultipleSchedulers=lambda schedulers: schedulers,
      time=None,
  )
  ns = _official(
      git_dir,
      YECHANP,
      YECHANP_FILE,
      {'kl_div_loss', 'make_feature_vector', 'BaseMethod', 'DDGSD'},
      namespace,
  )
  net = _Outputs(logits, features)
  method = ns['DDGSD'](types.SimpleNamespace(lam_kd=1.0), net)
  x = torch.zeros(2 * BATCH, 1)
  y = torch.tensor(np.concatenate([labels, labels]))  # its sampler yields each index twice
  losses, _ = method.calculate_loss(x, y)
  losses['loss_total'].backward()
  return losses['loss_total'].item(), net.logits.grad.numpy(), net.features.grad.numpy()


def _selfkd_lib(git_dir, logits, features, labels):
  ns = _official(git_dir, SELFKD_LIB, SELFKD_UTILS, {'DistillKL'}, dict(torch=torch, nn=nn, F=F))
  ns = _official(git_dir, SELFKD_LIB, SELFKD_FILE, {'DDGSD'}, dict(ns))
  net = _Outputs(logits, features)
  inputs = [torch.zeros(BATCH, 1), torch.zeros(BATCH, 1)]  # TwoCropsTransform's two crops
  _, loss_cls, loss_div = ns['DDGSD'](
      net, inputs, torch.tensor(labels), nn.CrossEntropyLoss(), ns['DistillKL'](4.0)
  )
  loss = loss_cls + loss_div  # main.py L235
  loss.backward()
  return loss.item(), net.logits.grad.numpy(), net.features.grad.numpy()


def main(yechanp_dir: str, selfkd_dir: str, out: str) -> None:
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch
  torch.set_default_dtype(torch.float64)  # torch.tensor(0.) accumulators
  rng = np.random.default_rng(13)
  arrays = {}
  for name, run, git_dir in (
      ('yechanp', _yechanp, yechanp_dir),
      ('selfkd_lib', _selfkd_lib, selfkd_dir),
  ):
    logits, features, labels = _draw(rng)
    loss, grad_logits, grad_features = run(git_dir, logits, features, labels)
    arrays.update(
        {
            f'{name}_logits': logits,
            f'{name}_features': features,
            f'{name}_labels': labels.astype(np.int32),
            f'{name}_loss': np.float64(loss),
            f'{name}_grad_logits': grad_logits,
            f'{name}_grad_features': grad_features,
        }
    )
  np.savez_compressed(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
