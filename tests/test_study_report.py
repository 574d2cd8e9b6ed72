"""The study report on hand-made workdirs: its statistics against closed forms, unfinished runs,
a missing baseline, the CSV read back, the plots written."""

import csv
import json
import math
import os

import pytest

from skd_jax import study_report

# Student's t 0.975 quantiles in closed form: 2 degrees of freedom, (2p - 1) sqrt(2 / (4p(1 - p)));
# 1, tan(pi (p - 1/2)). (The 4.302652729911275 of some tables is off in the 10th digit.)
T_975_2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))
T_975_1 = math.tan(math.pi * 0.475)

STEPS_PER_EPOCH = 10
BINS = {
    'count': [0, 0, 0, 1, 2, 3, 4, 10, 30, 50],
    'confidence': [0, 0, 0, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.97],
    'accuracy': [0, 0, 0, 0.0, 0.5, 0.33, 0.5, 0.7, 0.8, 0.98],
}


def _run(study, entry, seed, *, top1, ece=5.0, epochs=3, done=None, step_seconds=0.1, bins=True):
  """A workdir as skd_jax.main leaves it: ``done`` epochs of ``epochs`` trained (all by default),
  ``summary.json`` once all are; metrics are offset per epoch so that the last one is ``top1``."""
  done = epochs if done is None else done
  path = os.path.join(study, entry, f'seed{seed}')
  os.makedirs(path)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({'seed': seed, 'num_epochs': epochs}, f)
  records = []
  for epoch in range(1, done + 1):
    step = epoch * STEPS_PER_EPOCH
    for s in (step - 5, step):
      records.append({'kind': 'train', 'step': s, 'epoch': s / STEPS_PER_EPOCH, 'loss': 3.0 / s})
    late = epochs - epoch
    records.append(
        {
            'kind': 'eval',
            'step': step,
            'epoch': float(epoch),
            'top1': top1 - late,
            'top5': 99.0 - late,
            'nll': 0.3 + 0.01 * late,
            'ece': ece + late,
            'aurc': 20.0 + late,
            'eaurc': 10.0 + late,
            # 4 s of compiling, then step_seconds a step (its eval included).
            'train_seconds': 4.0 + step * step_seconds,
        }
    )
  if bins and records:
    records[-1]['reliability'] = BINS
  with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in records)
  if done == epochs:
    final = records[-1]
    summary = {k: final[k] for k in ('top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc')}
    summary.update(
        best_top1=final['top1'],
        best_epoch=epochs,
        train_seconds=final['train_seconds'],
        epochs=epochs,
        steps=epochs * STEPS_PER_EPOCH,
    )
    with open(os.path.join(path, 'summary.json'), 'w') as f:
      json.dump(summary, f)


def _mean(xs):
  return sum(xs) / len(xs)


def _std(xs):
  m = _mean(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _interval(d, t):
  half = t * _std(d) / math.sqrt(len(d))
  return _mean(d) - half, _mean(d) + half


def _csv(study):
  with open(os.path.join(study, 'results.csv')) as f:
    return {(row['entry'], row['metric']): row for row in csv.DictReader(f)}


BASE_TOP1 = [90.0, 91.0, 92.5]
PSKD_TOP1 = [91.0, 92.2, 93.3]  # differences 1.0, 1.2, 0.8: beyond seed noise
BASE_ECE = [5.0, 6.0, 4.0]
PSKD_ECE = [4.5, 6.5, 4.1]  # differences -0.5, 0.5, 0.1: within it


@pytest.fixture(scope='module')
def study(tmp_path_factory):
  """A study of 3 entries with unfinished runs, and the paths its report wrote."""
  study = str(tmp_path_factory.mktemp('study'))
  for seed in range(3):
    _run(study, 'ce', seed, top1=BASE_TOP1[seed], ece=BASE_ECE[seed])
    _run(study, 'pskd', seed, top1=PSKD_TOP1[seed], ece=PSKD_ECE[seed], step_seconds=0.25)
  _run(study, 'pskd', 3, top1=10.0, ece=50.0, done=1)  # unfinished: never averaged
  _run(study, 'cskd', 0, top1=90.5, bins=False)  # no reliability bins
  _run(study, 'cskd', 1, top1=92.0)
  _run(study, 'cskd', 2, top1=1.0, done=2)
  with open(os.path.join(study, 'study.json'), 'w') as f:
    json.dump({'baseline': 'ce', 'entries': ['ce', 'pskd', 'cskd']}, f)
  return study, study_report.write_report(study)


def test_statistics_equal_their_closed_forms_and_the_csv_reads_back_the_same(study):
  study, written = study
  assert sorted(os.path.basename(p) for p in written) == [
      'bars.png',
      'curves.png',
      'reliability.png',
      'results.csv',
      'results.md',
      'train_loss.png',
  ]
  rows = _csv(study)
  approx = lambda x: pytest.approx(x, rel=1e-12, abs=1e-12)

  top1 = rows['pskd', 'top1']
  assert int(top1['n']) == 3  # seed 3 is unfinished
  assert float(top1['mean']) == approx(_mean(PSKD_TOP1))
  assert float(top1['std']) == approx(_std(PSKD_TOP1))
  assert [float(top1[f'seed{s}']) for s in range(3)] == PSKD_TOP1  # exactly, as in summary.json
  assert top1['seed3'] == ''
  d = [a - b for a, b in zip(PSKD_TOP1, BASE_TOP1)]
  low, high = _interval(d, T_975_2)
  assert int(top1['diff_n']) == 3 and float(top1['diff_mean']) == approx(_mean(d))
  assert (float(top1['diff_low']), float(top1['diff_high'])) == (approx(low), approx(high))
  assert low > 0 and top1['diff_excludes_zero'] == '1'
  assert 'pskd seed 3: epoch 1 of 3' in top1['unfinished']

  ece = rows['pskd', 'ece']
  d = [a - b for a, b in zip(PSKD_ECE, BASE_ECE)]
  low, high = _interval(d, T_975_2)
  assert (float(ece['diff_low']), float(ece['diff_high'])) == (approx(low), approx(high))
  assert low < 0 < high and ece['diff_excludes_zero'] == '0'

  # cskd: seed 2 unfinished, so 2 pairs and 1 degree of freedom.
  cskd = rows['cskd', 'top1']
  d = [90.5 - BASE_TOP1[0], 92.0 - BASE_TOP1[1]]
  assert int(cskd['n']) == 2 and int(cskd['diff_n']) == 2
  assert float(cskd['diff_high']) == approx(_interval(d, T_975_1)[1])

  # The step cost: 0.25 s against 0.1 s a step; the first epoch's compiling is left out.
  assert float(rows['ce', 'step_seconds']['mean']) == approx(0.1)
  assert float(rows['pskd', 'step_cost']['mean']) == approx(2.5)
  assert float(rows['ce', 'step_cost']['mean']) == approx(1.0)
  assert float(rows['pskd', 'best_epoch']['mean']) == 3
  assert ('ce', 'top1') in rows and rows['ce', 'top1']['diff_n'] == ''  # no difference to itself

  for path in written:
    assert os.path.getsize(path) > 0
    if path.endswith('.png'):
      with open(path, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_markdown_marks_differences_beyond_noise_and_lists_unfinished_runs(study):
  study, _ = study
  with open(os.path.join(study, 'results.md')) as f:
    text = f.read()
  lines = text.splitlines()
  main = [line for line in lines if line.startswith('| `pskd` | 3 |')]
  assert main and f'{_mean(PSKD_TOP1):.2f} ± {_std(PSKD_TOP1):.2f}' in main[0]
  assert '| 2.50 ± 0.00 |' in main[0]  # step cost
  d = [a - b for a, b in zip(PSKD_TOP1, BASE_TOP1)]
  low, high = _interval(d, T_975_2)
  assert f'+{_mean(d):.2f} [+{low:.2f}, +{high:.2f}] *' in text
  assert '* pskd seed 3: epoch 1 of 3' in text
  assert '* cskd seed 2: epoch 2 of 3' in text
  assert 'cskd seed 0: its last eval record has no reliability bins' in text
  assert '![reliability](reliability.png)' in text
  assert [line.split('|')[1].strip() for line in lines if line.startswith('| `')][:3] == [
      '`ce`',
      '`pskd`',
      '`cskd`',
  ]  # study.json's order


def test_without_a_baseline_there_are_no_differences_and_a_half_finished_study_reports(tmp_path):
  study = str(tmp_path)
  _run(study, 'pskd', 0, top1=91.0, bins=False)
  _run(study, 'cskd', 0, top1=30.0, done=1)  # nothing finished yet
  (tmp_path / 'reliability.png').write_bytes(b'an earlier report')
  written = study_report.write_report(study)
  # No finished run has reliability bins: no diagram, and the earlier one is gone.
  assert sorted(os.path.basename(p) for p in written if p.endswith('.png')) == [
      'bars.png',
      'curves.png',
      'train_loss.png',
  ]
  assert not (tmp_path / 'reliability.png').exists()
  rows = _csv(study)
  assert float(rows['pskd', 'top1']['mean']) == 91.0 and rows['pskd', 'top1']['std'] == ''
  assert all(row['diff_n'] == '' for row in rows.values())
  assert ('pskd', 'step_cost') not in rows
  assert rows['cskd', '']['n'] == '0' and 'epoch 1 of 3' in rows['cskd', '']['unfinished']
  with open(os.path.join(study, 'results.md')) as f:
    text = f.read()
  assert 'No baseline: no differences.' in text and 'Paired difference' not in text
  assert all(os.path.getsize(p) > 0 for p in written)

  # A baseline named in study.json that has no runs is said, not guessed.
  with open(os.path.join(study, 'study.json'), 'w') as f:
    json.dump({'baseline': 'ce'}, f)
  study_report.write_report(study, plots=False)
  with open(os.path.join(study, 'results.md')) as f:
    assert "The baseline 'ce' has no runs in this folder" in f.read()


def test_an_entry_named_baseline_is_the_baseline_without_study_json(tmp_path):
  study = str(tmp_path)
  for seed, (a, b) in enumerate([(90.0, 91.0), (91.0, 91.5)]):
    _run(study, 'baseline', seed, top1=a)
    _run(study, 'ls', seed, top1=b)
  assert [os.path.basename(p) for p in study_report.write_report(study, plots=False)] == [
      'results.md',
      'results.csv',
  ]
  rows = _csv(study)
  assert float(rows['ls', 'top1']['diff_mean']) == pytest.approx(0.75)
  with open(os.path.join(study, 'results.md')) as f:
    assert 'Paired difference to `baseline`' in f.read()


def test_reliability_bins_pool_over_seeds_weighted_by_their_counts(tmp_path):
  def run(seed, bins):
    records = [{'kind': 'eval', 'step': 10, 'epoch': 1.0, 'top1': 50.0, 'reliability': bins}]
    return study_report.Run('e', seed, str(tmp_path), records, {'top1': 50.0}, 1)

  a = {'count': [2, 0, 6], 'confidence': [0.2, 0.0, 0.9], 'accuracy': [0.5, 0.0, 1.0]}
  b = {'count': [2, 1, 2], 'confidence': [0.3, 0.5, 0.8], 'accuracy': [0.0, 1.0, 0.5]}
  notes = []
  missing = study_report.Run('e', 2, str(tmp_path), [{'kind': 'eval', 'step': 10}], {}, 1)
  count, confidence, accuracy, used = study_report.pooled_reliability(
      [run(0, a), run(1, b), missing], notes
  )
  assert used == 2 and len(notes) == 1 and 'e seed 2' in notes[0]
  assert count.tolist() == [4, 1, 8]
  assert confidence.tolist() == pytest.approx([0.25, 0.5, (6 * 0.9 + 2 * 0.8) / 8])
  assert accuracy.tolist() == pytest.approx([0.25, 1.0, (6 + 1) / 8])
