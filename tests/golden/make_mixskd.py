"""Writes tests/golden/mixskd.npz: MixSKD's training loss and its gradients from the official code.

MixSKD (Yang et al., ECCV 2022) is official in winycg/Self-KD-Lib (the authors' library),
https://github.com/winycg/Self-KD-Lib at commit ede3062d1193626da2bc8a1ceba535d84fb0a08c:

* ``main_mixskd_cifar.py`` (blob e635c684): ``mixup_criterion`` (L129-130) is executed; the
  step's loss (L169-201: mixtures of outputs and features, ``loss_cls``, ``loss_mixcls``,
  ``loss_div``, ``loss_fea``, ``loss_gan``, ``loss = loss_cls + loss_div + loss_fea +
  loss_gan``) is inline in ``train()`` and is restated below statement by statement;
* ``utils.py`` (blob 4b6a5edc): ``DistillKL`` (L101-112), ``criterion_div = DistillKL(kd_T)``
  with the official ``kd_T`` 3;
* ``methods/adversarial.py`` (blob 1fa95889): ``Discriminator`` and ``discriminatorLoss``
  (``criterion_gan``), executed with their random initialisation (never trained, as in the
  official run: ``self.classifier`` is a plain list); their weights are saved.

Nothing of theirs is copied here: the script reads each file from a git directory of that
repository (a clone, or the bare mirror the ``fetch`` tool makes), checks its blob id, and
executes the text of just those top-level definitions (picked by name with ``ast``). The
network is replaced by its outputs: ``logits`` (K = 4 exits of ``[2B, C]``, originals then
mixed images), ``features`` (4 maps ``[2B, D, H, W]``) and the self-teacher's two outputs
(``ensemle_logits`` = h(F̂), ``ensemble_mixup_logits`` = h(F̃)), all leaf tensors, with a fixed
``lam`` and ``index`` (the permutation). ``Tensor.cuda`` is the identity.

Saved: the inputs (maps as ``[2B, H, W, D]``, JAX's layout), ``lam``, ``perm``, labels, the
discriminators' weights, the CIFAR loss (``loss``) and its gradients with respect to every input
(``g_*``), and the same plus ``loss_mixcls`` (the ImageNet script adds it: ``loss_imagenet``,
gradients ``gi_*``).

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_mixskd.py SELFKD_LIB_GIT_DIR tests/golden/mixskd.npz
"""

import ast
import hashlib
import subprocess
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

COMMIT = 'ede3062d1193626da2bc8a1ceba535d84fb0a08c'
MAIN = 'main_mixskd_cifar.py', 'e635c684d5acf1dc1e1bc8c5fba9145ddf770b7c'
UTILS = 'utils.py', '4b6a5edc676ef72f3cd4934e9d0e07facae16936'
ADVERSARIAL = 'methods/adversarial.py', '1fa958891dd227cad545d7f7742942447a897211'
BATCH, CLASSES, DIM, SIDE, EXITS, KD_T = 6, 10, 8, 2, 4, 3.0


def _official(git_dir, file_blob, names, namespace):
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
  nn.Module.cuda = lambda self, *args, **kwargs: self
  torch.set_default_dtype(torch.float64)
  torch.manual_seed(0)  # the discriminators' initialisation
  ns = _official(git_dir, UTILS, {'DistillKL'}, dict(torch=torch, nn=nn, F=F))
  ns = _official(git_dir, MAIN, {'mixup_criterion'}, ns)
  ns = _official(git_dir, ADVERSARIAL, {'Discriminator', 'discriminatorLoss'}, ns)
  criterion_cls, criterion_div = nn.CrossEntropyLoss(), ns['DistillKL'](KD_T)
  criterion_gan = ns['discriminatorLoss']([DIM] * EXITS)
  with torch.no_grad():  # weights exactly representable in float32, as saved
    for d in criterion_gan.classifier:
      for p in d.parameters():
        p.copy_(p.float().double())
  mixup_criterion = ns['mixup_criterion']

  rng = np.random.default_rng(5)
  bs = BATCH
  leaf = lambda a: torch.tensor(a, dtype=torch.float64, requires_grad=True)
  z = [(rng.normal(size=(2 * bs, CLASSES)) * 2.0).astype(np.float32) for _ in range(EXITS)]
  f = [np.abs(rng.normal(size=(2 * bs, DIM, SIDE, SIDE))).astype(np.float32) for _ in range(EXITS)]
  t_hat = (rng.normal(size=(bs, CLASSES)) * 2.0).astype(np.float32)
  t_tilde = (rng.normal(size=(bs, CLASSES)) * 2.0).astype(np.float32)
  labels = rng.integers(0, CLASSES, bs)
  lam = 0.3
  index_np = rng.permutation(bs)
  logits, features = [leaf(a) for a in z], [leaf(a) for a in f]
  ensemle_logits, ensemble_mixup_logits = leaf(t_hat), leaf(t_tilde)
  targets = torch.tensor(labels)
  index = torch.tensor(index_np)
  targets_a, targets_b = targets, targets[index]  # mixup_data's L125

  # main_mixskd_cifar.py L169-201, restated.
  mix_logits = [lam * logit[:bs] + (1 - lam) * logit[index] for logit in logits]
  ensemble_features = [lam * (fea[:bs]) + (1 - lam) * (fea[index]) for fea in features]
  mixup_logits = [logit[bs:] for logit in logits]
  mixup_features = [fea[bs:] for fea in features]
  loss_cls = torch.tensor(0.0)
  loss_mixcls = torch.tensor(0.0)
  for logit in logits:
    loss_cls += criterion_cls(logit[:bs], targets)
  for mixup_logit in mixup_logits:
    loss_mixcls += mixup_criterion(criterion_cls, mixup_logit, targets_a, targets_b, lam)
  loss_mixcls += mixup_criterion(criterion_cls, ensemle_logits, targets_a, targets_b, lam)
  loss_mixcls += mixup_criterion(criterion_cls, ensemble_mixup_logits, targets_a, targets_b, lam)
  loss_div = torch.tensor(0.0)
  loss_div += criterion_div(mix_logits[-1], ensemble_mixup_logits.detach())
  loss_div += criterion_div(mixup_logits[-1], ensemle_logits.detach())
  for i in range(len(mix_logits) - 1):
    loss_div += criterion_div(mix_logits[i], mixup_logits[i].detach())
    loss_div += criterion_div(mixup_logits[i], mix_logits[i].detach())
  loss_fea = torch.tensor(0.0)
  for fi in range(len(features)):
    loss_fea += F.mse_loss(ensemble_features[fi], mixup_features[fi])
  loss_gan = criterion_gan(ensemble_features, mixup_features)
  loss = loss_cls + loss_div + loss_fea + loss_gan
  leaves = logits + features + [ensemle_logits, ensemble_mixup_logits]
  imagenet = torch.autograd.grad(loss + loss_mixcls, leaves, retain_graph=True)
  loss.backward()

  arrays = dict(
      lam=np.float64(lam),
      perm=index_np.astype(np.int32),
      labels=labels.astype(np.int32),
      t_hat=t_hat,
      t_tilde=t_tilde,
      # Teachers only, detached: no gradient in the CIFAR loss.
      g_t_hat=np.zeros_like(t_hat) if ensemle_logits.grad is None else ensemle_logits.grad.numpy(),
      g_t_tilde=np.zeros_like(t_tilde)
      if ensemble_mixup_logits.grad is None
      else ensemble_mixup_logits.grad.numpy(),
      loss=np.float64(loss.item()),
      loss_imagenet=np.float64(loss.item() + loss_mixcls.item()),
      kd_T=np.float64(KD_T),
  )
  arrays['gi_t_hat'], arrays['gi_t_tilde'] = imagenet[-2].numpy(), imagenet[-1].numpy()
  for k in range(EXITS):
    arrays[f'gi_z{k}'] = imagenet[k].numpy()
    arrays[f'gi_f{k}'] = imagenet[EXITS + k].numpy().transpose(0, 2, 3, 1)
    arrays[f'z{k}'] = z[k]
    arrays[f'f{k}'] = f[k].transpose(0, 2, 3, 1)
    arrays[f'g_z{k}'] = logits[k].grad.numpy()
    arrays[f'g_f{k}'] = features[k].grad.numpy().transpose(0, 2, 3, 1)
    mlp = criterion_gan.classifier[k].classifier
    linear1, linear2 = mlp[0], mlp[2]
    arrays[f'd{k}_w1'] = linear1.weight.detach().numpy().T.astype(np.float32)
    arrays[f'd{k}_b1'] = linear1.bias.detach().numpy().astype(np.float32)
    arrays[f'd{k}_w2'] = linear2.weight.detach().numpy().T.astype(np.float32)
    arrays[f'd{k}_b2'] = linear2.bias.detach().numpy().astype(np.float32)
  # Gradients in float32 (7 digits: enough for the test's rtol 1e-5).
  arrays = {k: v.astype(np.float32) if k.startswith('g') else v for k, v in arrays.items()}
  np.savez_compressed(out, **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
