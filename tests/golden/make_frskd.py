"""Writes tests/golden/frskd.npz: the official FRSKD self-teacher, loss and gradients.

The reference is https://github.com/MingiJi/FRSKD at commit
98b87e5182be9b9aba905369efa23c85987e08ad, directory ``classification``: the self-teacher
``BiFPNc`` (``models/bifpnc.py``, with ``DepthConvBlock`` and ``MaxPool2dStaticSamePadding`` of
``models/utils.py``) and the criterion ``Attention`` (``distill_loss/AT.py``, with ``DistillKL``
of ``distill_loss/KD.py``), built as ``main.py`` builds them (``--bifpn BiFPNc --width 2 --depth 2
--repeat 1``, ``--distill att --alpha 2 --beta 100 --temperature 4``) and added as ``utils.py``'s
``train`` adds them without SLA or mixing::

  loss = CE(outputs) + Attention(outputs, bi_outputs, feats, bi_feats) + CE(bi_outputs)

The four files are checked against their git blob ids and executed as they are (as modules of
stand-in packages, so their relative imports resolve). Nothing of theirs is copied here. The
backbone is replaced by fixed leaf tensors: the classifier's logits ``z`` and its three stage
maps ``f1, f2, f3`` (after ReLU, as the official backbones return them; NHWC 8x8x2, 4x4x4,
2x2x8, each half the previous size, as the official ``scale_factor=2`` upsampling needs),
B = 3, C = 5. The self-teacher has PyTorch's default initialisation (seed 17) except its BN scales
and biases and fusion weights, drawn at random so that every parameter matters; it runs in
train mode (batch statistics).

Float64 throughout (``torch.set_default_dtype``, and ``.double()`` for the fusion weights that
``bifpnc.py`` declares float32) on float32-representable inputs and parameters.
Saved: the inputs (``z``, ``f1..f3`` in NHWC, ``labels``), every parameter of the self-teacher
under its ``state_dict`` name (``p:<name>``, PyTorch layout; these three in float32, which holds
them exactly), its outputs (``t1..t3`` NHWC in float32, ``zt``), the scalar loss and the gradients of the loss with respect to the inputs (``g_z``,
``g_f1..g_f3``) and to every parameter (``g:<name>``), and the hyperparameters.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_frskd.py FRSKD_GIT_DIR tests/golden/frskd.npz
"""

import hashlib
import subprocess
import sys
import types

import numpy as np
import torch

COMMIT = '98b87e5182be9b9aba905369efa23c85987e08ad'
FILES = {
    'classification/distill_loss/KD.py': 'e2e0d347d74091fa307c9bbad7774ca70a4a5aa5',
    'classification/distill_loss/AT.py': 'd992f66511110915fccd63978c81db5c228491be',
    'classification/models/utils.py': '0d5ade048abf9caad9278c182bf79e7ef56ba099',
    'classification/models/bifpnc.py': 'f5ee3120cbed8cda6f7c3326f904450157e0f67b',
}
BATCH, CLASSES = 3, 5
SHAPES = ((2, 8), (4, 4), (8, 2))  # (channels, size) of the three stage maps
ALPHA, BETA, T, WIDTH, DEPTH = 2.0, 100.0, 4.0, 2, 2


def _module(git_dir: str, path: str, package: str) -> types.ModuleType:
  """``path`` at ``COMMIT``, checked by its blob id, executed as a module of ``package``."""
  data = subprocess.run(
      ['git', f'--git-dir={git_dir}', 'show', f'{COMMIT}:{path}'], check=True, capture_output=True
  ).stdout
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != FILES[path]:
    sys.exit(f'{path} at {COMMIT}: git blob {found}, expected {FILES[path]}')
  if package not in sys.modules:
    parent = types.ModuleType(package)
    parent.__path__ = []
    sys.modules[package] = parent
  name = f'{package}.{path.rsplit("/", 1)[1][:-3]}'
  module = types.ModuleType(name)
  module.__package__ = package
  sys.modules[name] = module
  exec(compile(data, f'{git_dir}:{COMMIT}:{path}', 'exec'), module.__dict__)
  return module


def _f32(x: np.ndarray) -> np.ndarray:
  return x.astype(np.float32).astype(np.float64)


def main(git_dir: str, out: str) -> None:
  torch.set_default_dtype(torch.float64)
  torch.manual_seed(17)
  _module(git_dir, 'classification/distill_loss/KD.py', 'frskd_losses')
  at = _module(git_dir, 'classification/distill_loss/AT.py', 'frskd_losses')
  _module(git_dir, 'classification/models/utils.py', 'frskd_models')
  bifpnc = _module(git_dir, 'classification/models/bifpnc.py', 'frskd_models')
  args = types.SimpleNamespace(
      repeat=1,
      depth=[DEPTH] * 3,
      width=WIDTH,
      num_features=len(SHAPES),
      alpha=ALPHA,
      beta=BETA,
      temperature=T,
  )
  teacher = bifpnc.BiFPNc([c for c, _ in SHAPES], CLASSES, args)
  teacher.double()  # its fusion weights are declared float32; everything else is float64
  rng = np.random.default_rng(17)
  with torch.no_grad():
    for name, p in teacher.named_parameters():
      if '_weight.' in name:
        p.copy_(torch.tensor(rng.uniform(0.2, 1.5, p.shape)))  # fusion weights
      elif p.ndim == 1 and '.conv.' in name:  # BN scale (weight) and bias
        p.copy_(
            torch.tensor(
                rng.uniform(0.5, 1.5, p.shape)
                if name.endswith('weight')
                else rng.normal(0, 0.2, p.shape)
            )
        )
      p.copy_(torch.tensor(_f32(p.numpy())))
  teacher.train()
  criterion = at.att(args, teacher)

  arrays = {'z': _f32(3 * rng.normal(size=(BATCH, CLASSES)))}
  for i, (c, s) in enumerate(SHAPES, start=1):
    arrays[f'f{i}'] = _f32(np.maximum(rng.normal(size=(BATCH, s, s, c)), 0.0))  # NHWC, post-ReLU
  labels = rng.integers(0, CLASSES, BATCH)
  leaves = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
  feats = [leaves[f'f{i}'].permute(0, 3, 1, 2) for i in range(1, len(SHAPES) + 1)]
  bi_feats, bi_outputs = teacher(feats)
  ce = torch.nn.CrossEntropyLoss()
  targets = torch.tensor(labels)
  loss = ce(leaves['z'], targets) + criterion(leaves['z'], bi_outputs, feats, bi_feats)
  loss = loss + ce(bi_outputs, targets)
  loss.backward()

  # Inputs and parameters are float32-representable and the refined maps are compared at 1e-5:
  # float32 loses nothing there and keeps the file small; the loss and gradients stay float64.
  arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
  arrays.update({f'g_{k}': v.grad.numpy() for k, v in leaves.items()})
  for name, p in teacher.named_parameters():
    arrays[f'p:{name}'] = p.detach().numpy().astype(np.float32)
    arrays[f'g:{name}'] = p.grad.numpy()
  for i, t in enumerate(bi_feats, start=1):
    arrays[f't{i}'] = t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32)
  arrays.update(
      zt=bi_outputs.detach().numpy(),
      labels=labels.astype(np.int32),
      loss=np.float64(loss.item()),
      alpha=ALPHA,
      beta=BETA,
      temperature=T,
      width=WIDTH,
      depth=DEPTH,
  )
  np.savez_compressed(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
