"""Writes tests/golden/seed_metrics.json: a tiny run's records, to keep a seed's numbers fixed.

The run is :func:`config` (PS-KD + DLB + CS-KD + SD-Dropout on mocked CIFAR-10, seed 3, 2
devices): it draws every random stream the trainer has (initialisation, data order, augmentation
of the main, partner and previous examples, the terms' key). The file was written on the commit
before the seed became an argument of the compiled programs (9df05bd), so
``tests/test_startup.py`` checks that this change left every number of a given seed as it was.

  PYTHONPATH=. python tests/golden/make_seed_metrics.py [OUT]

With ``OUT`` it writes the records there instead (the test does so, compiled as users compile).
"""

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)

sys.path.insert(0, os.path.join(os.path.dirname(HERE), 'tests'))
import runs  # pylint: disable=g-import-not-at-top,wrong-import-position

PATH = os.path.join(HERE, 'seed_metrics.json')
DEVICES = 2


def config():
  c = runs.config('pskd_dlb', seed=3)
  c.loss.cskd = dict(weight=1.0, temperature=4.0)
  c.loss.sd_dropout = dict(weight=0.1, rate=0.5, temperature=3.0, stop_gradient=False)
  return c


def main(path=PATH):
  with tempfile.TemporaryDirectory() as workdir:
    runs.run(config(), workdir, devices=DEVICES)
    records = runs.without_time(runs.records(workdir))
  with open(path, 'w') as f:
    json.dump(records, f, indent=1)
    f.write('\n')


if __name__ == '__main__':
  main(*sys.argv[1:])
