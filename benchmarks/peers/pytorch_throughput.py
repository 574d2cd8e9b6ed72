r"""PyTorch peer of benchmarks/throughput.py: training images/s of the same models and steps.

Same models (CIFAR ResNet-18 with a 3x3 stem and no max-pool, torchvision's ResNet-50, the quick
configs' small ResNet), batch sizes and optimizer (SGD, Nesterov momentum 0.9, lr 0.1, weight decay
5e-4 on every parameter, cross-entropy; PS-KD: soft targets mixed from a per-example history of
past predictions, alpha 0.8, the history updated every step). Synthetic uint8 images live on the
device; each step gathers a batch, normalises it and trains in channels-last layout; bfloat16 runs
under torch.autocast. Warm-up steps, then interleaved rounds of timed steps (baseline, PS-KD,
baseline, ...), synchronised at the end of each round; the median round counts.

FLOPs per step are torch.utils.flop_counter's count of one training step (convolutions and
matmuls, forward and backward). Prints the same table and JSON lines as throughput.py.

  python benchmarks/peers/pytorch_throughput.py --models=cifar_resnet18 --batch_sizes=128
"""

import argparse
import itertools
import os
import statistics
import sys
import time

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import report  # pylint: disable=wrong-import-position  # benchmarks/report.py


class BasicBlock(nn.Module):
  """Post-activation block: conv3x3-BN-ReLU-conv3x3-BN + shortcut (1x1 conv + BN if reshaped)."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Identity()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
  """skd_jax.models.resnet.ResNet: 3x3 stride-1 stem + BN + ReLU, no max-pool, BasicBlock stages."""

  def __init__(self, num_classes, in_channels, stage_sizes, widths, strides):
    super().__init__()
    layers = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])]
    layers.append(nn.ReLU())
    cin = widths[0]
    for size, width, stride in zip(stage_sizes, widths, strides):
      for j in range(size):
        layers.append(BasicBlock(cin, width, stride if j == 0 else 1))
        cin = width
    self.body = nn.Sequential(*layers)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.head(self.body(x).mean((2, 3)))


def _resnet50(num_classes):
  import torchvision  # pylint: disable=import-outside-toplevel

  return torchvision.models.resnet50(num_classes=num_classes)


# Name -> (constructor, image shape CHW, classes, default batch sizes).
MODELS = {
    'cifar_resnet18': (
        lambda n: ResNet(n, 3, (2, 2, 2, 2), (64, 128, 256, 512), (1, 2, 2, 2)),
        (3, 32, 32),
        100,
        (128, 512),
    ),
    'resnet50': (_resnet50, (3, 224, 224), 1000, (256,)),
    'small_resnet': (
        lambda n: ResNet(n, 1, (1, 1, 1), (16, 32, 64), (2, 2, 2)),
        (1, 28, 28),
        10,
        (128,),
    ),
}


class Job:
  """A model, its optimizer, synthetic data on the device and one training step."""

  def __init__(self, model_name, batch_size, dtype, method, device, num_examples, layout):
    build, shape, self.num_classes, _ = MODELS[model_name]
    torch.manual_seed(0)
    self.layout = layout
    self.model = build(self.num_classes).to(device, memory_format=layout)
    self.optimizer = torch.optim.SGD(
        self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    n = max(num_examples, 2 * batch_size)
    self.images = torch.randint(0, 256, (n, *shape), dtype=torch.uint8, device=device)
    self.labels = torch.randint(0, self.num_classes, (n,), device=device)
    self.history = torch.zeros(n, self.num_classes, device=device) if method == 'pskd' else None
    self.batch_size, self.dtype, self.device = batch_size, dtype, device
    self.mean = torch.full((1, shape[0], 1, 1), 0.5, device=device)
    self.std = torch.full((1, shape[0], 1, 1), 0.25, device=device)

  def step(self):
    index = torch.randint(0, len(self.labels), (self.batch_size,), device=self.device)
    x = (self.images[index].float() / 255 - self.mean) / self.std
    x = x.contiguous(memory_format=self.layout)
    labels = self.labels[index]
    with torch.autocast(self.device.type, torch.bfloat16, enabled=self.dtype == 'bfloat16'):
      logits = self.model(x)
    logits = logits.float()
    if self.history is None:
      loss = F.cross_entropy(logits, labels)
    else:
      alpha = 0.8
      target = (1 - alpha) * F.one_hot(labels, self.num_classes) + alpha * self.history[index]
      loss = torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
      self.history[index] = F.softmax(logits.detach(), -1)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss

  def flops(self):
    with FlopCounterMode(display=False) as counter:
      self.step()
    return counter.get_total_flops()


def _sync(device, value):
  if device.type == 'cuda':
    torch.cuda.synchronize()
  return value.item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default='cifar_resnet18,resnet50')
  parser.add_argument('--batch_sizes', default='', help="empty: each model's defaults")
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--methods', default='baseline,pskd', help='the first is the reference')
  parser.add_argument('--steps', type=int, default=20, help='steps per timed block')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps of each job')
  parser.add_argument('--examples', type=int, default=2048)
  parser.add_argument(
      '--channels_last', type=int, default=1, help='1: channels-last (NHWC) memory; 0: NCHW'
  )
  parser.add_argument('--threads', type=int, default=0, help='torch.set_num_threads; 0: default')
  parser.add_argument('--peak_tflops', type=float, default=None)
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
  torch.backends.cudnn.benchmark = True
  methods = args.methods.split(',')
  layout = torch.channels_last if args.channels_last else torch.contiguous_format
  rows = []
  for model_name, dtype in itertools.product(args.models.split(','), args.dtypes.split(',')):
    batches = [int(b) for b in args.batch_sizes.split(',') if b] or MODELS[model_name][3]
    for batch_size in batches:
      jobs = {
          m: Job(model_name, batch_size, dtype, m, device, args.examples, layout) for m in methods
      }
      flops = {m: job.flops() for m, job in jobs.items()}
      for job in jobs.values():
        for _ in range(args.warmup):
          loss = job.step()
        _sync(device, loss)
      times = {m: [] for m in methods}
      for _ in range(args.rounds):
        for m, job in jobs.items():
          start = time.perf_counter()
          for _ in range(args.steps):
            loss = job.step()
          _sync(device, loss)
          times[m].append((time.perf_counter() - start) / args.steps)
      peak = report.peak_tflops(name, dtype, args.peak_tflops)
      reference = statistics.median(times[methods[0]])
      for m in methods:
        seconds = statistics.median(times[m])
        rows.append(
            dict(
                framework=f'torch {torch.__version__}',
                model=model_name,
                image=MODELS[model_name][1],
                batch=batch_size,
                dtype=dtype,
                method=m,
                step_s=seconds,
                img_per_s=batch_size / seconds,
                ratio=seconds / reference,
                gflop_per_step=flops[m] / 1e9,
                tflops=flops[m] / seconds / 1e12,
                mfu=flops[m] / seconds / (peak * 1e12) if peak else None,
                device=f'1 x {name}, {torch.get_num_threads()} threads',
                channels_last=bool(args.channels_last),
                steps=args.steps,
                rounds=args.rounds,
            )
        )
  report.print_rows(f'{rows[0]["device"]}, {args.rounds} rounds x {args.steps} steps', rows)


if __name__ == '__main__':
  main()
