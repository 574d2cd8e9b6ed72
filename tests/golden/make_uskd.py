"""Writes tests/golden/uskd.npz: USKD's loss and its gradients from the official code.

Runs, on fixed small random inputs, the official PyTorch ``USKDLoss`` of
https://github.com/yzd-v/cls_KD at commit 1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66 (branch
``1.0``, its newest commit), file ``mmcls/models/dis_losses/uskd.py`` (git blob dbe31090; the
``master`` branch's ``mmcls/distillation/losses/uskd.py`` differs only in its registry import). The
file is checked against that blob id, then executed as it is, with two stubs: a module
``mmcls.registry`` whose ``MODELS.register_module()`` returns the class unchanged (L4, L6), and
``torch.Tensor.cuda`` returning the tensor itself while the loss is built (L29 puts the Zipf vector
on a GPU). Nothing of theirs is copied here.

The loss is computed in float64 (``torch.set_default_dtype``) with the CIFAR-100 config's weights
(``configs/distillers/cifar100/res18_sd_cifar.py``: alpha = beta = mu = 0.1) on B = 8 examples,
C = 10 classes and an intermediate feature of 6 channels (``fea_mid``, the pooled stage output the
official ``distiller.py`` L178 passes), with the loss's own ``fc`` (the weak head) set to fixed
values. Saved: the inputs, the weak head's logits ``fea_mid @ W.T + b``, the loss and its gradients
with respect to the logits, the feature, ``W`` and ``b``:

* ``whole_*``: one call on all 8 examples (the mean of the target term over all of them);
* ``grouped_*``: one call on each half of the same inputs, as on two GPUs of 4 examples each; the
  saved loss is the mean of the two (DistributedDataParallel averages the two GPUs' gradients).

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_uskd.py CLS_KD_CHECKOUT tests/golden/uskd.npz
"""

import hashlib
import pathlib
import sys
import types

import numpy as np
import torch

FILE = 'mmcls/models/dis_losses/uskd.py'
BLOB = 'dbe310907654964607e7aad5843a1eba07efc86c'
BATCH, CLASSES, CHANNELS = 8, 10, 6
ALPHA, BETA, MU = 0.1, 0.1, 0.1


def _official_loss_class(checkout: pathlib.Path):
  """``USKDLoss`` of the official file, executed with a stub registry."""
  data = (checkout / FILE).read_bytes()
  found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
  if found != BLOB:
    sys.exit(f'{checkout / FILE}: git blob {found}, expected {BLOB} (wrong commit?)')
  registry = types.ModuleType('mmcls.registry')
  registry.MODELS = types.SimpleNamespace(register_module=lambda: (lambda cls: cls))
  sys.modules['mmcls'] = types.ModuleType('mmcls')
  sys.modules['mmcls.registry'] = registry
  namespace = {'__name__': 'official_uskd'}
  exec(compile(data, str(checkout / FILE), 'exec'), namespace)
  return namespace['USKDLoss']


def _inputs():
  rng = np.random.default_rng(17)
  return {
      # Logit magnitudes up to ~8 so that the probabilities and the ranking are far from uniform.
      'logits': 3.0 * rng.normal(size=(BATCH, CLASSES)),
      'features': rng.normal(size=(BATCH, CHANNELS)),
      'kernel': 0.5 * rng.normal(size=(CLASSES, CHANNELS)),  # PyTorch's [out, in]
      'bias': 0.1 * rng.normal(size=(CLASSES,)),
      # Eight different classes of the ten, shuffled.
      'labels': rng.permutation(np.arange(BATCH) % CLASSES).astype(np.int64),
  }


def _official_run(loss_class, inputs, groups: int, prefix: str) -> dict[str, np.ndarray]:
  """The official loss (the mean over ``groups`` equal parts of the batch) and its gradients."""
  cuda = torch.Tensor.cuda
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  try:
    loss_fn = loss_class(
        name='loss_uskd',
        use_this=True,
        channel=CHANNELS,
        alpha=ALPHA,
        beta=BETA,
        mu=MU,
        num_classes=CLASSES,
    )
  finally:
    torch.Tensor.cuda = cuda
  with torch.no_grad():
    loss_fn.fc.weight.copy_(torch.tensor(inputs['kernel']))
    loss_fn.fc.bias.copy_(torch.tensor(inputs['bias']))
  logits = torch.tensor(inputs['logits'], requires_grad=True)
  features = torch.tensor(inputs['features'], requires_grad=True)
  labels = torch.tensor(inputs['labels'])
  parts = [
      loss_fn(f, z, y)
      for f, z, y in zip(features.chunk(groups), logits.chunk(groups), labels.chunk(groups))
  ]
  loss = torch.stack(parts).mean()
  loss.backward()
  with torch.no_grad():
    weak = loss_fn.fc(features)
  return {
      f'{prefix}_loss': loss.detach().numpy(),
      f'{prefix}_weak_logits': weak.numpy(),
      f'{prefix}_grad_logits': logits.grad.numpy(),
      f'{prefix}_grad_features': features.grad.numpy(),
      f'{prefix}_grad_kernel': loss_fn.fc.weight.grad.numpy(),
      f'{prefix}_grad_bias': loss_fn.fc.bias.grad.numpy(),
  }


def main(argv):
  if len(argv) != 3:
    sys.exit(f'usage: {argv[0]} CLS_KD_CHECKOUT OUT.npz')
  checkout, out = map(pathlib.Path, argv[1:])
  torch.set_default_dtype(torch.float64)
  loss_class = _official_loss_class(checkout)
  inputs = _inputs()
  arrays = {
      **inputs,
      **_official_run(loss_class, inputs, 1, 'whole'),
      **_official_run(loss_class, inputs, 2, 'grouped'),
      'alpha': np.float64(ALPHA),
      'beta': np.float64(BETA),
      'mu': np.float64(MU),
  }
  np.savez_compressed(out, **arrays)
  print(f'{out}: {", ".join(f"{k} {v.shape}" for k, v in arrays.items())}')


if __name__ == '__main__':
  main(sys.argv)
