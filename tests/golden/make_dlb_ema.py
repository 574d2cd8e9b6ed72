"""Writes tests/golden/dlb_ema.npz: DLB's losses and Beta smoothing's EMA from the official code.

Runs, on fixed small inputs, the official PyTorch code of

* DLB (Shen et al., CVPR 2022): https://github.com/Meta-knowledge-Lab/DLB at commit
  8949a4621072cbd9d0d9d78bf8d9fba0f1814ed0, file ``dlb.py`` (blob 62399dc7) and its ``utils.py``
  (blob 9934f36d);
* Beta smoothing (Zhang & Sabuncu, NeurIPS 2020):
  https://github.com/ZhiluZhang123/neurips_2020_distillation at commit
  f913a077b2f6507fe6cba418004787c34b9f5ffa, file ``train_smoothing.py`` (blob 11323d65).

Both are the newest commits of their repositories. The files are checked against those git blob
ids before anything runs. Nothing of theirs is copied here: the script executes their source text.

DLB: ``train_one_epoch`` (``dlb.py`` L64-113) is compiled from the file and called as its
``train`` does (L142-148: ``pre_data, pre_out`` start as None and carry over from one epoch to the
next), for two epochs, with a tiny linear model (its forward records every output), plain SGD,
``args.T = 3`` and ``alpha = 1`` (``configs/dlb.py``). The ``AverageMeter`` the function
instantiates records every loss value it is given (L99). Two runs: ``dlb_*`` on 12 examples (three
full batches of 4 per epoch) and ``dlb_short_*`` on 10 (batches of 4, 4 and 2, the reference's
``drop_last=False``). Saved per step ``s``, padded to 4 slots with ``valid`` masks: the current
batch's logits ``out`` (L75) and labels, the previous batch's logits ``out_pre`` recomputed at step
``s`` (L82; none at step 0) and its labels, and the loss (L95 or, at step 0, L97).

EMA: the update block of the training loop (``train_smoothing.py`` L143-146: the step counter,
the decay ``min(1 - 1/(global_step + 1), args.lamda)`` and the in-place average) is executed on an
EMA network with its own random initialisation (L71-72, L84-86) after each of four fixed student
parameter sets, with ``args.lamda = 0.7`` so that the cap is reached at the third update. Saved:
the initial EMA parameters, the student's parameters of each update and the EMA parameters after
each update.

Usage (PyTorch and NumPy in a scratch environment, never this project's)::

  python tests/golden/make_dlb_ema.py DLB_CHECKOUT NEURIPS2020_CHECKOUT tests/golden/dlb_ema.npz
"""

import ast
import hashlib
import pathlib
import sys
import textwrap
import types

import numpy as np
import torch
from torch.nn import functional as F

DLB_FILES = {
    'dlb.py': '62399dc747dfa0564470675b15f1d27650604222',
    'utils.py': '9934f36d711cddd96f2c5e50bb398cd80b295635',
}
EMA_FILES = {'train_smoothing.py': '11323d655922cd5976a6a5b065acdfe990084234'}
EMA_LINES = (143, 146)  # train_smoothing.py: global_step += 1 ... ema_param.data.mul_(...)

FEATURES, CLASSES, BATCH, EPOCHS = 6, 5, 4, 2
TEMPERATURE, ALPHA, LR = 3.0, 1.0, 0.5
EMA_MAX_DECAY, EMA_UPDATES = 0.7, 4


def _checked_source(checkout: pathlib.Path, files: dict[str, str], name: str) -> str:
  """The text of ``checkout/name`` after checking every file of ``files`` by its git blob id."""
  for path, blob in files.items():
    data = (checkout / path).read_bytes()
    found = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
    if found != blob:
      sys.exit(f'{checkout / path}: git blob {found}, expected {blob} (wrong commit?)')
  return (checkout / name).read_text()


class _RecordingLinear(torch.nn.Linear):
  """A linear classifier that keeps a copy of every output it computes."""

  def __init__(self, *shape):
    super().__init__(*shape)
    self.outputs = []

  def forward(self, x):
    out = super().forward(x)
    self.outputs.append(out.detach().clone())
    return out


def _official_train_one_epoch(checkout: pathlib.Path):
  """``train_one_epoch`` of the official ``dlb.py``, and the list of the meters it creates."""
  source = _checked_source(checkout, DLB_FILES, 'dlb.py')
  sys.path.insert(0, str(checkout))
  import utils  # pylint: disable=import-outside-toplevel  # the official dlb/utils.py

  meters = []

  class RecordingMeter(utils.AverageMeter):
    """The official meter, also keeping every value it is given."""

    def __init__(self):
      super().__init__()
      self.values = []
      meters.append(self)

    def update(self, val, n=1):
      self.values.append(val)
      super().update(val, n)

  # dlb.py runs argparse and builds datasets at import; only train_one_epoch is compiled.
  (function,) = [
      node
      for node in ast.parse(source).body
      if isinstance(node, ast.FunctionDef) and node.name == 'train_one_epoch'
  ]
  namespace = {
      'torch': torch,
      'F': F,
      'args': types.SimpleNamespace(T=TEMPERATURE),
      'AverageMeter': RecordingMeter,
      'accuracy': utils.accuracy,
  }
  exec(compile(ast.Module([function], []), str(checkout / 'dlb.py'), 'exec'), namespace)
  return namespace['train_one_epoch'], meters


def _dlb_run(train_one_epoch, meters, num_examples: int, prefix: str) -> dict[str, np.ndarray]:
  """Two epochs of the official loop over ``num_examples`` fixed examples in batches of 4.

  Every array is padded to the batch size; ``valid`` marks the real slots of each step's current
  batch and ``previous_valid`` those of its previous batch (none at step 0).
  """
  meters.clear()
  torch.manual_seed(0)
  model = _RecordingLinear(FEATURES, CLASSES)
  optimizer = torch.optim.SGD(model.parameters(), lr=LR)
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.normal(size=(num_examples, 2, FEATURES)), dtype=torch.float32)
  labels = torch.tensor(rng.integers(0, CLASSES, num_examples))
  # The reference's DataLoader(shuffle=True, drop_last=False): the order does not enter the loss.
  loader = [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, num_examples, BATCH)]
  # dlb.py L142-148: the previous batch and its logits carry over across epochs.
  pre_data, pre_out = None, None
  for _ in range(EPOCHS):
    _, _, pre_data, pre_out = train_one_epoch(model, optimizer, loader, ALPHA, pre_data, pre_out)

  # Per epoch, the function creates its accuracy meter first and its loss meter second (L66-67).
  losses = np.array([val for meter in meters[1::2] for val in meter.values], np.float64)
  batches = loader * EPOCHS
  steps = len(batches)
  assert len(losses) == steps and len(model.outputs) == 2 * steps - 1
  # Forward order: step 0 the current batch (L75); later steps the current then the previous (L82).
  outputs = [o.numpy() for o in model.outputs]
  pad = lambda x: np.concatenate([x, np.zeros((BATCH - len(x), *x.shape[1:]), x.dtype)])
  current = [pad(o) for o in [outputs[0]] + outputs[1::2]]
  previous = [np.zeros((BATCH, CLASSES), np.float32)] + [pad(o) for o in outputs[2::2]]
  batch_labels = [pad(y.numpy().astype(np.int32)) for _, y in batches]
  valid = [pad(np.ones(len(y), bool)) for _, y in batches]
  return {
      f'{prefix}_logits': np.stack(current),
      f'{prefix}_labels': np.stack(batch_labels),
      f'{prefix}_valid': np.stack(valid),
      f'{prefix}_previous_logits': np.stack(previous),
      f'{prefix}_previous_labels': np.stack(batch_labels[:1] + batch_labels[:-1]),
      f'{prefix}_previous_valid': np.stack([np.zeros(BATCH, bool)] + valid[:-1]),
      f'{prefix}_loss': losses,
  }


def dlb_golden(checkout: pathlib.Path) -> dict[str, np.ndarray]:
  """The official DLB loop's steps on full batches (12 examples) and with a short last batch (10)."""
  train_one_epoch, meters = _official_train_one_epoch(checkout)
  return {
      **_dlb_run(train_one_epoch, meters, 3 * BATCH, 'dlb'),
      **_dlb_run(train_one_epoch, meters, 3 * BATCH - 2, 'dlb_short'),
      'dlb_temperature': np.float64(TEMPERATURE),
      'dlb_alpha': np.float64(ALPHA),
  }


def ema_golden(checkout: pathlib.Path) -> dict[str, np.ndarray]:
  """The official EMA network's parameters after updates 1..4 of fixed student parameters."""
  lines = _checked_source(checkout, EMA_FILES, 'train_smoothing.py').splitlines()
  block = textwrap.dedent('\n'.join(lines[EMA_LINES[0] - 1 : EMA_LINES[1]]))
  assert block.startswith('global_step += 1\nalpha_now = min(1 - 1 / (global_step + 1)'), block
  update = compile(block, str(checkout / 'train_smoothing.py'), 'exec')

  torch.manual_seed(1)
  model = torch.nn.Linear(FEATURES, CLASSES)
  ema_model = torch.nn.Linear(FEATURES, CLASSES)  # its own initialisation, as L71-72
  for param in ema_model.parameters():  # L84-86
    param.detach_()
  as_numpy = lambda m: [p.detach().numpy().copy() for p in m.parameters()]
  initial = as_numpy(ema_model)
  rng = np.random.default_rng(1)
  namespace = {
      'global_step': 0,  # L88
      'args': types.SimpleNamespace(lamda=EMA_MAX_DECAY),
      'model': model,
      'ema_model': ema_model,
  }
  student, after = [], []
  for _ in range(EMA_UPDATES):
    with torch.no_grad():  # stands for an optimizer step: fixed new student parameters
      for param in model.parameters():
        param.copy_(torch.tensor(rng.normal(size=param.shape), dtype=torch.float32))
    exec(update, namespace)
    student.append(as_numpy(model))
    after.append(as_numpy(ema_model))
  stack = lambda rows, i: np.stack([r[i] for r in rows])
  return {
      'ema_initial_kernel': initial[0],
      'ema_initial_bias': initial[1],
      'ema_student_kernel': stack(student, 0),
      'ema_student_bias': stack(student, 1),
      'ema_kernel': stack(after, 0),
      'ema_bias': stack(after, 1),
      'ema_max_decay': np.float64(EMA_MAX_DECAY),
  }


def main(argv):
  if len(argv) != 4:
    sys.exit(f'usage: {argv[0]} DLB_CHECKOUT NEURIPS2020_CHECKOUT OUT.npz')
  dlb_checkout, ema_checkout, out = map(pathlib.Path, argv[1:])
  arrays = {**dlb_golden(dlb_checkout), **ema_golden(ema_checkout)}
  np.savez_compressed(out, **arrays)
  print(f'{out}: {", ".join(f"{k} {v.shape}" for k, v in arrays.items())}')


if __name__ == '__main__':
  main(sys.argv)
