"""Writes tests/golden/zipf_ls.npz: Zipf's label smoothing's votes, loss and gradient, officially.

Runs the official PyTorch code of Zipf's LS (Liang et al., ECCV 2022),
https://github.com/megvii-research/zipfls at commit 108e27aaf81aee0dc6dcd965ed6389f2ea06ba10
(the commit METHODS.md names, also the newest), directory ``pytorch_zipfls``:

* ``cifar_models/resnet.py`` (blob 554f0560), ``get_dense_info`` (L278-292, nested in
  ``CIFAR_ResNet.forward``): the upsampled (``F.upsample(scale_factor=2., mode='bilinear')``) or
  plain last feature map through the classifier at every location, argmax per location, and the
  pooled logits. The function is compiled from the file's text with ``self.upsample`` set;
* ``losses.py`` (blob 7032d456), ``zipf_loss`` (L150-155) with ``dense=True``,
  ``distribution='rank_zipf'``, ``rank='hard'``, ``loss_mask=False`` (the CIFAR command of
  ``pytorch_zipfls/README.md``: ``--dense --loss_lambda 0.1``), which calls ``gen_pdf``
  (L225-292: votes, ``scipy.stats.rankdata(method='min')``, ``get_masked_distribution``) and
  ``kl_loss`` (L130-147); ``losses.py`` imports ``zipf_utils.py`` (blob e59d9f57);
* the training loss as ``train.py``'s ``train`` forms it (L176-203 with ``deeplayer=1``):
  ``loss_lambda * zipf_loss + CrossEntropyLoss()(logits, labels)``.

Nothing of theirs is copied here: the files are read from a git directory of that repository (a
clone, or the bare mirror the ``fetch`` tool makes), checked against their blob ids and executed.
``.cuda()`` (``losses.py`` L153) is replaced by the identity on a CPU-only PyTorch.

Cases (float32, fixed random feature maps and classifiers; in half of the examples the map leans
toward the label's classifier row, so that the label often wins the vote):

* ``cifar``: B = 16, C = 100, a 4x4 map of 32 channels, bilinear x2 (64 votes), lambda 0.1,
  power 1;
* ``plain``: B = 8, C = 10, a 3x3 map of 16 channels, no upsampling (9 votes), lambda 1,
  power 2 (``--power``).

Saved per case: the map (NHWC, as skd_jax's models give it), the classifier's weight and bias,
the pooled logits, labels, the official per-location argmax, the ``zipf_loss`` value, the total
loss and its gradient with respect to the logits.

Usage (PyTorch, NumPy and SciPy in a scratch environment, never this project's)::

  python tests/golden/make_zipf_ls.py ZIPFLS_GIT_DIR tests/golden/zipf_ls.npz
"""

import ast
import hashlib
import pathlib
import subprocess
import sys
import tempfile
import types

import numpy as np
import torch
from torch.nn import functional as F

COMMIT = '108e27aaf81aee0dc6dcd965ed6389f2ea06ba10'
FILES = {
    'pytorch_zipfls/losses.py': '7032d456d9d072c1b14076061029994833a66c16',
    'pytorch_zipfls/zipf_utils.py': 'e59d9f573803961d1044766d774c1f870e92d0bd',
    'pytorch_zipfls/cifar_models/resnet.py': '554f05609301ad691e6bba75b7f5a20621100d9e',
}
CASES = {
    'cifar': dict(batch=16, classes=100, size=4, depth=32, upsample='bilinear', lam=0.1, power=1.0),
    'plain': dict(batch=8, classes=10, size=3, depth=16, upsample=None, lam=1.0, power=2.0),
}


def _checked_files(git_dir: str, into: pathlib.Path) -> None:
  """Writes the official files at ``COMMIT`` under ``into`` after checking their blob ids."""
  for path, blob in FILES.items():
    data = subprocess.run(
        ['git', f'--git-dir={git_dir}', 'show', f'{COMMIT}:{path}'], check=True, capture_output=True
    ).stdout
    found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
    if found != blob:
      sys.exit(f'{path} at {COMMIT}: git blob {found}, expected {blob}')
    (into / pathlib.Path(path).name).write_bytes(data)


def _official_get_dense_info(source: str, upsample):
  """``get_dense_info`` nested in ``CIFAR_ResNet.forward``, with ``self.upsample = upsample``."""
  named = lambda nodes, kind, name: [n for n in nodes if isinstance(n, kind) and n.name == name]
  (cls,) = named(ast.parse(source).body, ast.ClassDef, 'CIFAR_ResNet')
  (forward,) = named(cls.body, ast.FunctionDef, 'forward')
  (function,) = named(forward.body, ast.FunctionDef, 'get_dense_info')
  namespace = {'F': F, 'self': types.SimpleNamespace(upsample=upsample)}
  exec(compile(ast.Module([function], []), 'cifar_models/resnet.py', 'exec'), namespace)
  return namespace['get_dense_info']


def main(git_dir: str, out: str) -> None:
  torch.Tensor.cuda = lambda self, *args, **kwargs: self  # CPU-only PyTorch
  tmp = pathlib.Path(tempfile.mkdtemp())
  _checked_files(git_dir, tmp)
  sys.path.insert(0, str(tmp))
  import losses  # pylint: disable=import-outside-toplevel  # the official pytorch_zipfls/losses.py

  resnet_source = (tmp / 'resnet.py').read_text()
  rng = np.random.default_rng(23)
  arrays = {}
  for name, case in CASES.items():
    b, c, s, d = case['batch'], case['classes'], case['size'], case['depth']
    weight = rng.normal(size=(c, d)).astype(np.float32)
    bias = (0.1 * rng.normal(size=c)).astype(np.float32)
    labels = rng.integers(0, c, b)
    maps = rng.normal(size=(b, s, s, d))
    maps[: b // 2] += 0.5 * weight[labels[: b // 2]][:, None, None, :]
    maps = maps.astype(np.float32)
    linear = torch.nn.Linear(d, c)
    with torch.no_grad():
      linear.weight.copy_(torch.tensor(weight))
      linear.bias.copy_(torch.tensor(bias))
    get_dense_info = _official_get_dense_info(resnet_source, case['upsample'])
    featmap = torch.tensor(maps).permute(0, 3, 1, 2)  # NCHW
    gap = torch.nn.AvgPool2d(s)
    with torch.no_grad():
      naive_logit, _, dense_argmax = get_dense_info(featmap, linear, gap)
    logits = naive_logit.clone().requires_grad_(True)
    y = torch.tensor(labels)
    args = types.SimpleNamespace()  # read only by the 'linear_decay'/'exponential_decay' priors
    kd = losses.zipf_loss(
        args, logits, dense_argmax, y, False, 'rank_zipf', True, 'hard', False, case['power']
    )
    total = case['lam'] * kd + torch.nn.CrossEntropyLoss()(logits, y)
    total.backward()
    arrays.update(
        {
            f'{name}_feature_map': maps,
            f'{name}_weight': weight,
            f'{name}_bias': bias,
            f'{name}_logits': naive_logit.numpy(),
            f'{name}_labels': labels.astype(np.int32),
            f'{name}_dense_argmax': dense_argmax.numpy().astype(np.int32),
            f'{name}_zipf_loss': np.float64(kd.item()),
            f'{name}_loss': np.float64(total.item()),
            f'{name}_grad': logits.grad.numpy(),
            f'{name}_lambda': np.float64(case['lam']),
            f'{name}_power': np.float64(case['power']),
            f'{name}_upsample': np.str_(case['upsample'] or 'none'),
        }
    )
  np.savez(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
