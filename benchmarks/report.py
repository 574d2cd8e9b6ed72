"""What throughput.py and peers/pytorch_throughput.py share (no JAX, no torch): peaks, the table.

Rows are dicts with the keys the table prints (model, batch, dtype, method, step_s, img_per_s,
ratio, gflop_per_step, tflops, mfu); each is also printed whole as one JSON line.
"""

import json
import statistics
import sys

# Dense peak TFLOP/s of one device: (substring of the device's name, dtype) -> peak. float32 on
# these GPUs runs convolutions and matmuls as TF32 by default (XLA and cuDNN), so its peak is the
# TF32 one.
PEAK_TFLOPS = {
    ('H100', 'bfloat16'): 989.0,
    ('H100', 'float32'): 494.5,
    ('H200', 'bfloat16'): 989.0,
    ('H200', 'float32'): 494.5,
    ('A100', 'bfloat16'): 312.0,
    ('A100', 'float32'): 156.0,
    ('TPU v4', 'bfloat16'): 275.0,
    ('TPU v5 lite', 'bfloat16'): 197.0,
    ('TPU v5p', 'bfloat16'): 459.0,
}


def peak_tflops(device_name, dtype, override=None):
  """The peak for MFU: ``override`` if given, else the table's, else None (e.g. a CPU)."""
  if override:
    return override
  for (kind, kind_dtype), peak in PEAK_TFLOPS.items():
    if kind in device_name and kind_dtype == dtype:
      return peak
  return None


def print_rows(title, rows):
  """A title line, the table, then one JSON line per row."""
  print(title)
  print(
      f'{"model":<15} {"batch":>5} {"dtype":<8} {"method":<8} {"s/step":>8} {"img/s":>8} '
      f'{"ratio":>6} {"GFLOP":>8} {"TFLOP/s":>8} {"MFU":>6}'
  )
  for r in rows:
    mfu = f'{100 * r["mfu"]:5.1f}%' if r['mfu'] is not None else 'n/a'
    print(
        f'{r["model"]:<15} {r["batch"]:>5} {r["dtype"]:<8} {r["method"]:<8} {r["step_s"]:8.4f} '
        f'{r["img_per_s"]:8.1f} {r["ratio"]:6.3f} {r["gflop_per_step"]:8.1f} '
        f'{r["tflops"]:8.3f} {mfu:>6}'
    )
  for r in rows:
    print(json.dumps(r))


def compare(lines):
  """Median img/s per framework of each case in JSON lines from both scripts, and their ratio.

  Returns text lines: model, batch, dtype, method, then each framework's median img/s over the
  runs and the first framework's over the second's.
  """
  runs = {}
  for line in lines:
    if line.startswith('{'):
      r = json.loads(line)
      case = (r['model'], r['batch'], r['dtype'], r['method'])
      runs.setdefault(case, {}).setdefault(r['framework'], []).append(r['img_per_s'])
  out = []
  for (model, batch, dtype, method), by_framework in runs.items():
    medians = {f: statistics.median(v) for f, v in by_framework.items()}
    text = ', '.join(f'{f} {m:.1f} img/s ({len(by_framework[f])} runs)' for f, m in medians.items())
    ratio = ''
    if len(medians) == 2:
      first, second = medians.values()
      ratio = f'; ratio {first / second:.3f}'
    out.append(f'{model} batch {batch} {dtype} {method}: {text}{ratio}')
  return out


if __name__ == '__main__':
  print('\n'.join(compare(sys.stdin)))
