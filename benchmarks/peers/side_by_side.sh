#!/usr/bin/env bash
# Runs benchmarks/throughput.py (JAX) and peers/pytorch_throughput.py alternately, REPEATS times
# each (JAX, PyTorch, JAX, ...), with the same flags, so that both see the same machine; then prints
# each case's median img/s per framework and the JAX / PyTorch ratio. The JSON lines of every run
# are kept in $OUT (default: a new temporary file).
#
#   benchmarks/peers/side_by_side.sh JAX_PYTHON TORCH_PYTHON REPEATS [flags of both scripts]
#   benchmarks/peers/side_by_side.sh .venv/bin/python ~/torchvenv/bin/python 3 \
#       --models=cifar_resnet18 --batch_sizes=128 --dtypes=float32 --steps=10 --rounds=3
set -euo pipefail
jax_python=$1 torch_python=$2 repeats=$3
shift 3
here=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$(mktemp)}
for _ in $(seq "$repeats"); do
  PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$jax_python" "$here/throughput.py" "$@" \
    2>/dev/null | grep '^{' >>"$out"
  "$torch_python" "$here/peers/pytorch_throughput.py" "$@" | grep '^{' >>"$out"
done
echo "JSON lines: $out"
python3 "$here/report.py" <"$out"
