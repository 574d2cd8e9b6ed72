r"""A quick study: five methods on the quick Fashion-MNIST setup, 3 seeds each.

Cross-entropy (the baseline), label smoothing, PS-KD, CS-KD and teacher KD taught by the
baseline run of the same seed, each with its config's `quick` setup (a small ResNet, 8 epochs):

  python -m skd_jax.study --study=configs/studies/quick.py --workdir=/tmp/study_quick

15 runs of about 4 minutes each on a 2-core CPU (about an hour). To try it in minutes, on fewer
seeds and one epoch:

  python -m skd_jax.study --study=configs/studies/quick.py --workdir=/tmp/study_try \
      --entries=baseline,pskd --seeds=0 --config.num_epochs=1

A study file's `get_config()` returns `entries` (a list of dicts, in the order the results list
them: `name`, `config` as for `skd_jax.main --config`, optional `overrides` as
`{'dotted.key': value}` and `teacher`, the name of the entry whose run of the same seed teaches
this one), `seeds` and `baseline` (the entry differences are taken against). See skd_jax/study.py.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.entries = [
      dict(name='baseline', config='configs/baseline.py:quick'),
      dict(name='label_smoothing', config='configs/label_smoothing.py:quick'),
      dict(name='pskd', config='configs/pskd.py:quick'),
      dict(name='cskd', config='configs/cskd.py:quick'),
      dict(name='teacher_kd', config='configs/teacher_kd.py:quick', teacher='baseline'),
  ]
  c.seeds = [0, 1, 2]
  c.baseline = 'baseline'
  return c
