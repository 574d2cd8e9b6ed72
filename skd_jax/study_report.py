"""A study's results, rebuilt from its run workdirs alone: tables with seed statistics, and plots.

A study folder holds one ordinary run workdir (``skd_jax.main``'s) per entry and seed,
``STUDY/<entry>/seed<k>/``, and may hold ``STUDY/study.json``, ``{"baseline": "<entry>", ...}``.
Without it, the baseline is the entry named ``baseline`` if there is one, else there is none and
no differences are computed. :func:`write_report` reads ``config.json``, ``metrics.jsonl`` and
``summary.json`` of every run, never a model or a dataset, so it works on a half-finished study
and on workdirs copied from elsewhere, and writes into the study folder:

* ``results.md`` (readable as a README section) and ``results.csv``: per entry, the number of
  finished seeds, mean ± sample standard deviation (``ddof=1``) and per-seed values of the final
  test ``top1``, ``top5``, ``nll``, ``ece``, ``aurc``, ``eaurc``, ``best_top1`` and ``best_epoch``,
  ``train_seconds``, the seconds per step and the step cost relative to the baseline; and the
  paired difference to the baseline over the seeds both have finished: with ``d_i`` the entry's
  value minus the baseline's for seed ``i``, ``n`` pairs, mean ``d̄`` and sample std ``s``, the
  95% confidence interval ``d̄ ± t_{0.975, n-1} s / √n`` (Student's t), marked ``*`` where it
  excludes 0. Runs without ``summary.json`` are listed as unfinished, with their last epoch, and
  left out of every statistic.
* ``reliability.png`` (per entry, pooled over its finished seeds: the accuracy of each confidence
  bin with its count, from the ``reliability`` bins of each run's last eval record; not drawn
  when no finished run has them),
  ``curves.png`` (test top-1, NLL and ECE against epoch: the mean over seeds and their min-max
  band), ``train_loss.png`` (training loss against step, the same way) and ``bars.png`` (final
  top-1 and ECE, mean with ± one std error bars and each seed's value). The plots need matplotlib
  (``pip install -e '.[study]'``); without it the tables are still written.

**Seconds per step** of a run: the median over consecutive evaluations of the growth of
``train_seconds`` divided by the steps between them. The first epoch (which compiles) and an
epoch a resume restarted (which compiles again) fall out of the median; with a single evaluation
it is ``train_seconds / step``. The step cost of seed ``k`` is its seconds per step over the
baseline's mean, so the entry's mean cost is the ratio of the means.

Command line: ``python -m skd_jax.study_report STUDY``.
"""

import csv
import dataclasses
import io
import json
import logging
import math
import os
import re
import sys
from typing import Any

import numpy as np

from skd_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

# (key, column title, decimals); summary.json's values, and those derived from the records.
METRICS = (
    ('top1', 'top-1 (%)', 2),
    ('top5', 'top-5 (%)', 2),
    ('nll', 'NLL', 4),
    ('ece', 'ECE (%)', 2),
    ('aurc', 'AURC', 2),
    ('eaurc', 'E-AURC', 2),
    ('best_top1', 'best top-1 (%)', 2),
    ('best_epoch', 'best epoch', 1),
    ('train_seconds', 'train time (s)', 1),
    ('step_seconds', 'ms/step', None),  # shown in milliseconds
    ('step_cost', 'step cost', 2),
)
# Those whose paired difference to the baseline is reported.
DIFFERENCES = ('top1', 'top5', 'nll', 'ece', 'aurc', 'eaurc', 'best_top1')
_TITLES = {key: title for key, title, _ in METRICS}
_DECIMALS = {key: decimals for key, _, decimals in METRICS}
_SEED = re.compile(r'^seed(\d+)$')


@dataclasses.dataclass
class Run:
  """One run workdir of a study, as read from its files."""

  entry: str
  seed: int
  path: str
  records: list[dict[str, Any]]
  summary: dict[str, Any] | None  # None until the run has finished
  num_epochs: int | None  # from config.json

  @property
  def finished(self) -> bool:
    return self.summary is not None

  @property
  def last_epoch(self) -> float:
    return max((r['epoch'] for r in self.evals), default=0)

  @property
  def evals(self) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get('kind') == 'eval']

  @property
  def step_seconds(self) -> float | None:
    """Training seconds per step (see the module docstring); None without evaluations."""
    evals = sorted(
        (r for r in self.evals if 'train_seconds' in r and r['step'] > 0), key=lambda r: r['step']
    )
    if not evals:
      return None
    if len(evals) == 1:
      return evals[0]['train_seconds'] / evals[0]['step']
    return float(
        np.median(
            [
                (b['train_seconds'] - a['train_seconds']) / (b['step'] - a['step'])
                for a, b in zip(evals, evals[1:])
            ]
        )
    )

  def values(self) -> dict[str, float]:
    """The run's final values of :data:`METRICS` (``step_cost`` aside), if finished."""
    values = {k: float(self.summary[k]) for k, _, _ in METRICS if k in (self.summary or {})}
    if self.step_seconds is not None:
      values['step_seconds'] = self.step_seconds
    return values


@dataclasses.dataclass
class Study:
  """Every run of a study folder, grouped by entry (in the study's order), and its baseline."""

  path: str
  runs: dict[str, list[Run]]
  baseline: str | None
  notes: list[str]


def _read_json(file: str) -> Any:
  with open(file) as f:
    return json.load(f)


def load(study_dir: str) -> Study:
  """Reads every run workdir ``STUDY/<entry>/seed<k>/`` and ``STUDY/study.json`` if present."""
  notes = []
  spec = {}
  spec_file = os.path.join(study_dir, 'study.json')
  if os.path.exists(spec_file):
    try:
      spec = _read_json(spec_file)
    except (OSError, ValueError) as e:
      notes.append(f'study.json could not be read ({e}); no baseline is assumed.')
    if not isinstance(spec, dict):
      spec = {}
  runs = {}
  for entry in sorted(os.listdir(study_dir)):
    folder = os.path.join(study_dir, entry)
    if not os.path.isdir(folder):
      continue
    seeds = sorted(
        (int(m.group(1)), name)
        for name in os.listdir(folder)
        if (m := _SEED.match(name)) and os.path.isdir(os.path.join(folder, name))
    )
    if seeds:
      runs[entry] = [
          _load_run(entry, seed, os.path.join(folder, name), notes) for seed, name in seeds
      ]
  baseline = spec.get('baseline', 'baseline' if 'baseline' in runs else None)
  if baseline is not None and baseline not in runs:
    notes.append(f'The baseline {baseline!r} has no runs in this folder: no differences.')
    baseline = None
  return Study(study_dir, _ordered(runs, spec, baseline), baseline, notes)


def _ordered(runs: dict[str, list[Run]], spec: dict, baseline: str | None) -> dict[str, list[Run]]:
  """The entries in study.json's order if it lists them, else the baseline first, then by name."""
  listed = spec.get('entries')
  if isinstance(listed, dict):
    listed = list(listed)
  names = []
  for item in listed if isinstance(listed, list) else []:
    name = item.get('name') if isinstance(item, dict) else item
    if isinstance(name, str) and name in runs and name not in names:
      names.append(name)
  if not names and baseline is not None:
    names.append(baseline)
  names += [name for name in runs if name not in names]
  return {name: runs[name] for name in names}


def _load_run(entry: str, seed: int, path: str, notes: list[str]) -> Run:
  records = workdir_lib.read_records(path)
  summary, num_epochs = None, None
  if os.path.exists(os.path.join(path, 'summary.json')):
    try:
      summary = _read_json(os.path.join(path, 'summary.json'))
    except (OSError, ValueError):
      notes.append(f'{entry} seed {seed}: summary.json does not read; counted as unfinished.')
  try:
    num_epochs = _read_json(os.path.join(path, 'config.json')).get('num_epochs')
  except (OSError, ValueError, AttributeError):
    pass
  return Run(entry, seed, path, records, summary, num_epochs)


# Statistics.


def t_quantile(probability: float, dof: int) -> float:
  """The ``probability`` quantile of Student's t distribution with ``dof`` degrees of freedom."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a dependency of jax)

  return float(stats.t.ppf(probability, dof))


@dataclasses.dataclass
class Summary:
  """Mean and sample std (``ddof=1``; NaN for one value) of ``n`` values."""

  n: int
  mean: float
  std: float

  @classmethod
  def of(cls, values) -> 'Summary':
    values = np.asarray(list(values), np.float64)
    n = len(values)
    return cls(
        n, float(values.mean()) if n else math.nan, float(values.std(ddof=1)) if n > 1 else math.nan
    )


@dataclasses.dataclass
class Difference:
  """The paired difference entry - baseline over ``n`` seeds: mean and its 95% t interval."""

  n: int
  mean: float
  low: float  # NaN with fewer than 2 pairs
  high: float

  @property
  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0  # False when NaN

  @classmethod
  def of(cls, pairs) -> 'Difference':
    d = np.asarray([a - b for a, b in pairs], np.float64)
    n = len(d)
    if n < 2:
      return cls(n, float(d.mean()) if n else math.nan, math.nan, math.nan)
    half = t_quantile(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return cls(n, float(d.mean()), float(d.mean() - half), float(d.mean() + half))


@dataclasses.dataclass
class EntryResult:
  """An entry's per-seed values (finished seeds), their summaries and differences to the
  baseline, and its unfinished runs."""

  name: str
  seeds: dict[int, dict[str, float]]  # seed -> metric -> value
  summaries: dict[str, Summary]
  differences: dict[str, Difference]
  unfinished: list[Run]


def results(study: Study) -> dict[str, EntryResult]:
  """Every entry's values and statistics (see the module docstring)."""
  seeds = {
      name: {run.seed: run.values() for run in runs if run.finished}
      for name, runs in study.runs.items()
  }
  base = seeds.get(study.baseline, {})
  base_step = [v['step_seconds'] for v in base.values() if 'step_seconds' in v]
  base_step = float(np.mean(base_step)) if base_step else None
  out = {}
  for name, runs in study.runs.items():
    values = seeds[name]
    if base_step:
      for v in values.values():
        if 'step_seconds' in v:
          v['step_cost'] = v['step_seconds'] / base_step
    summaries = {
        key: Summary.of(v[key] for v in values.values() if key in v)
        for key, _, _ in METRICS
        if any(key in v for v in values.values())
    }
    differences = {}
    if study.baseline is not None and name != study.baseline:
      for key in DIFFERENCES:
        pairs = [
            (v[key], base[s][key])
            for s, v in values.items()
            if s in base and key in v and key in base[s]
        ]
        if pairs:
          differences[key] = Difference.of(pairs)
    out[name] = EntryResult(
        name, values, summaries, differences, [r for r in runs if not r.finished]
    )
  return out


# Tables.


def _number(value: float, key: str) -> str:
  if value is None or not math.isfinite(value):
    return '–'
  if key == 'step_seconds':
    return f'{1000 * value:.1f}'
  return f'{value:.{_DECIMALS[key]}f}'


def _mean_std(summary: Summary | None, key: str) -> str:
  if summary is None or summary.n == 0:
    return '–'
  if summary.n == 1:
    return _number(summary.mean, key)
  return f'{_number(summary.mean, key)} ± {_number(summary.std, key)}'


def _signed(value: float, key: str) -> str:
  text = _number(value, key)
  return text if text.startswith('-') or text == '–' else '+' + text


def _difference(diff: Difference | None, key: str) -> str:
  if diff is None:
    return '–'
  if diff.n < 2:
    return f'{_signed(diff.mean, key)} (n=1)'
  mark = ' *' if diff.excludes_zero else ''
  return f'{_signed(diff.mean, key)} [{_signed(diff.low, key)}, {_signed(diff.high, key)}]{mark}'


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _unfinished(run: Run) -> str:
  of = f' of {run.num_epochs}' if run.num_epochs else ''
  if not run.evals:
    return f'{run.entry} seed {run.seed}: not evaluated yet (no epoch finished)'
  return f'{run.entry} seed {run.seed}: epoch {run.last_epoch:g}{of}'


def markdown(
    study: Study, table: dict[str, EntryResult], plots: list[str], notes: list[str]
) -> str:
  """``results.md``: the tables, the plots and the notes."""
  shown = [k for k, _, _ in METRICS if k != 'step_cost' or study.baseline is not None]
  lines = ['# Study results', '']
  finished = sum(len(r.seeds) for r in table.values())
  lines.append(
      f'{finished} finished run(s) in {len(table)} entries; mean ± sample std over the finished '
      'seeds (n); per-seed values below. '
      + (
          f"Baseline: `{study.baseline}`; step cost = seconds per step over the baseline's."
          if study.baseline
          else 'No baseline: no differences.'
      )
  )
  lines.append('')
  rows = [
      [f'`{r.name}`', str(len(r.seeds))] + [_mean_std(r.summaries.get(k), k) for k in shown]
      for r in table.values()
  ]
  lines += _table(['entry', 'n'] + [_TITLES[k] for k in shown], rows)
  if study.baseline is not None:
    lines += [
        '',
        f'## Paired difference to `{study.baseline}`',
        '',
        'Entry minus baseline over the seeds both have finished (pairs): mean [95% confidence '
        "interval, Student's t with pairs - 1 degrees of freedom]; `*` where the interval excludes "
        '0, i.e. the difference is beyond seed noise at this level.',
        '',
    ]
    rows = []
    for r in table.values():
      if r.name == study.baseline:
        continue
      pairs = max((d.n for d in r.differences.values()), default=0)
      rows.append(
          [f'`{r.name}`', str(pairs)] + [_difference(r.differences.get(k), k) for k in DIFFERENCES]
      )
    lines += _table(['entry', 'pairs'] + ['Δ ' + _TITLES[k] for k in DIFFERENCES], rows)
  lines += ['', '## Per seed', '']
  seed_keys = [k for k in shown if k != 'step_cost']
  rows = [
      [f'`{r.name}`', str(seed)] + [_number(v.get(k, math.nan), k) for k in seed_keys]
      for r in table.values()
      for seed, v in sorted(r.seeds.items())
  ]
  lines += _table(['entry', 'seed'] + [_TITLES[k] for k in seed_keys], rows)
  unfinished = [run for r in table.values() for run in r.unfinished]
  if unfinished:
    lines += ['', '## Unfinished runs (not averaged)', '']
    lines += [f'* {_unfinished(run)}' for run in unfinished]
  if plots:
    lines += ['', '## Plots', '']
    lines += [f'![{os.path.splitext(p)[0]}]({p})' for p in plots]
  if notes:
    lines += ['', '## Notes', '']
    lines += [f'* {note}' for note in notes]
  return '\n'.join(lines) + '\n'


CSV_COLUMNS = ('entry', 'metric', 'n', 'mean', 'std')
CSV_DIFFERENCE = ('diff_n', 'diff_mean', 'diff_low', 'diff_high', 'diff_excludes_zero')


def csv_text(table: dict[str, EntryResult]) -> str:
  """``results.csv``: one row per entry and metric: n, mean, std, each seed's value (a column
  ``seed<k>`` per seed of the study, empty where that seed has not finished), the paired
  difference to the baseline, and the entry's unfinished runs. Numbers at full precision."""
  seeds = sorted({s for r in table.values() for s in [*r.seeds, *(u.seed for u in r.unfinished)]})
  out = io.StringIO()
  writer = csv.writer(out, lineterminator='\n')
  writer.writerow(CSV_COLUMNS + tuple(f'seed{s}' for s in seeds) + CSV_DIFFERENCE + ('unfinished',))

  def cell(value):
    return '' if value is None or not math.isfinite(value) else repr(float(value))

  for r in table.values():
    unfinished = '; '.join(_unfinished(run) for run in r.unfinished)
    for key, summary in r.summaries.items():
      diff = r.differences.get(key)
      row = [r.name, key, summary.n, cell(summary.mean), cell(summary.std)]
      row += [cell(r.seeds.get(s, {}).get(key)) for s in seeds]
      if diff is None:
        row += ['', '', '', '', '']
      else:
        row += [diff.n, cell(diff.mean), cell(diff.low), cell(diff.high), int(diff.excludes_zero)]
      writer.writerow(row + [unfinished])
    if not r.summaries:  # nothing finished: one row says so
      writer.writerow([r.name, '', 0, '', ''] + [''] * len(seeds) + [''] * 5 + [unfinished])
  return out.getvalue()


# Plots.


def pooled_reliability(runs: list[Run], notes: list[str]):
  """``(count, confidence, accuracy, runs used)`` per bin, pooled over the ``reliability`` bins of
  ``runs``' last eval records: counts summed, confidence and accuracy averaged weighted by the
  counts (NaN in empty bins). Runs without bins are left out with a line in ``notes``; None if no
  run has them."""
  count = conf = correct = None
  used = 0
  for run in runs:
    evals = run.evals
    bins = evals[-1].get('reliability') if evals else None
    try:
      c, cf, ac = (np.asarray(bins[k], np.float64) for k in ('count', 'confidence', 'accuracy'))
      if not c.shape == cf.shape == ac.shape or c.ndim != 1:
        raise ValueError
    except (TypeError, KeyError, ValueError):
      notes.append(
          f'{run.entry} seed {run.seed}: its last eval record has no reliability bins; left out of '
          'the reliability diagram.'
      )
      continue
    cf, ac = np.nan_to_num(cf), np.nan_to_num(ac)  # empty bins
    if count is None:
      count, conf, correct = np.zeros_like(c), np.zeros_like(c), np.zeros_like(c)
    if c.shape != count.shape:
      notes.append(f'{run.entry} seed {run.seed}: another number of reliability bins; left out.')
      continue
    count, conf, correct, used = count + c, conf + c * cf, correct + c * ac, used + 1
  if count is None:
    return None
  with np.errstate(invalid='ignore', divide='ignore'):
    return count, conf / count, correct / count, used


def _figure(rows: int, cols: int, width: float, height: float):
  # A Figure without pyplot: no global backend, no window; savefig renders with Agg.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  figure = Figure(figsize=(width * cols, height * rows), layout='constrained')
  return figure, figure.subplots(rows, cols, squeeze=False)


def _plot_reliability(study: Study, path: str, notes: list[str]) -> bool:
  """The diagram of every entry; none (False) when no finished run has reliability bins."""
  entries = list(study.runs)
  pooled_bins = {
      name: pooled_reliability([r for r in runs if r.finished], notes)
      for name, runs in study.runs.items()
  }
  if all(p is None for p in pooled_bins.values()):
    return False
  cols = min(4, len(entries))
  rows = math.ceil(len(entries) / cols)
  figure, axes = _figure(rows, cols, 3.4, 3.4)
  for ax in axes.flat[len(entries) :]:
    ax.set_visible(False)
  for ax, name in zip(axes.flat, entries):
    pooled = pooled_bins[name]
    ax.plot([0, 1], [0, 1], '--', color='gray', linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.12), xlabel='confidence', ylabel='accuracy')
    if pooled is None:
      ax.set_title(f'{name}: no reliability bins', fontsize=9)
      continue
    count, conf, acc, used = pooled
    edges = np.linspace(0, 1, len(count) + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    filled = count > 0
    ax.bar(
        centres[filled],
        acc[filled],
        width=width,
        edgecolor='black',
        linewidth=0.5,
        alpha=0.8,
        label='accuracy',
    )
    ax.plot(
        conf[filled], acc[filled], 'o', color='crimson', markersize=3, label='(mean conf., acc.)'
    )
    for x, y, n in zip(centres[filled], acc[filled], count[filled]):
      ax.text(x, y + 0.01, f'{int(n)}', ha='center', va='bottom', fontsize=6, rotation=90)
    ece = 100 * np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / count.sum()
    ax.set_title(f'{name} ({used} seed(s), pooled ECE {ece:.2f}%)', fontsize=9)
    ax.legend(loc='upper left', fontsize=6)
  figure.suptitle('Reliability: accuracy per confidence bin (count above each bar)', fontsize=10)
  figure.savefig(path, dpi=110)
  return True


def _curve_runs(runs: list[Run]) -> list[Run]:
  """The finished runs if there are any (a mean over the same seeds at every point), else all."""
  return [r for r in runs if r.finished] or runs


def _band(ax, series: list[dict[float, float]], label: str, color) -> None:
  """Mean line and min-max band of ``series`` (x -> y per run) at every x some run reached."""
  xs = sorted({x for s in series for x in s})
  if not xs:
    return
  ys = [[s[x] for s in series if x in s] for x in xs]
  ax.plot(xs, [np.mean(y) for y in ys], color=color, label=label, linewidth=1.2)
  if len(series) > 1:
    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2)


def _colors(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  cmap = colormaps['tab10' if n <= 10 else 'tab20']
  return [cmap(i % cmap.N) for i in range(n)]


def _plot_curves(study: Study, path: str) -> bool:
  figure, axes = _figure(1, 3, 4.2, 3.3)
  keys = (('top1', 'test top-1 (%)'), ('nll', 'test NLL'), ('ece', 'test ECE (%)'))
  for (name, runs), color in zip(study.runs.items(), _colors(len(study.runs))):
    chosen = _curve_runs(runs)
    for ax, (key, _) in zip(axes[0], keys):
      series = [{r['epoch']: r[key] for r in run.evals if key in r} for run in chosen]
      _band(ax, series, f'{name} ({len(chosen)})', color)
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  for ax, (_, title) in zip(axes[0], keys):
    ax.set(xlabel='epoch', title=title)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  figure.suptitle('Test metrics per epoch: mean over seeds (n), min-max band', fontsize=10)
  figure.savefig(path, dpi=110)
  return True


def _plot_train_loss(study: Study, path: str) -> bool:
  figure, axes = _figure(1, 1, 7, 4)
  ax = axes[0][0]
  for (name, runs), color in zip(study.runs.items(), _colors(len(study.runs))):
    chosen = _curve_runs(runs)
    series = [
        {r['step']: r['loss'] for r in run.records if r.get('kind') == 'train' and 'loss' in r}
        for run in chosen
    ]
    _band(ax, series, f'{name} ({len(chosen)})', color)
  ax.set(xlabel='step', ylabel='training loss (weighted total)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title('Training loss: mean over seeds (n), min-max band', fontsize=10)
  figure.savefig(path, dpi=110)
  return True


def _plot_bars(study: Study, table: dict[str, EntryResult], path: str) -> bool:
  names = [n for n, r in table.items() if r.seeds]
  if not names:
    return False
  figure, axes = _figure(1, 2, max(3.5, 0.6 * len(names) + 1.5), 3.6)
  x = np.arange(len(names))
  for ax, key in zip(axes[0], ('top1', 'ece')):
    means = [table[n].summaries[key].mean if key in table[n].summaries else np.nan for n in names]
    stds = [
        np.nan_to_num(table[n].summaries[key].std) if key in table[n].summaries else 0
        for n in names
    ]
    colors = ['gray' if n == study.baseline else 'tab:blue' for n in names]
    ax.bar(x, means, yerr=stds, capsize=3, color=colors, alpha=0.8)
    for i, n in enumerate(names):
      points = [v[key] for v in table[n].seeds.values() if key in v]
      ax.plot([i] * len(points), points, 'k.', markersize=4)
    ax.set_xticks(x, names, rotation=45, ha='right', fontsize=8)
    ax.set_title(f'final {_TITLES[key]}: mean ± std, seeds as dots', fontsize=9)
    ax.grid(axis='y', alpha=0.3)
    finite = [m for m in means if np.isfinite(m)]
    if key == 'top1' and finite:  # the differences are small next to the bars' height
      spread = [m - s for m, s in zip(means, stds) if np.isfinite(m)]
      ax.set_ylim(max(0, min(spread) - 2), min(100, max(finite) + max(stds) + 1))
  figure.savefig(path, dpi=110)
  return True


def write_report(study_dir: str, *, plots: bool = True) -> list[str]:
  """Writes ``results.md``, ``results.csv`` and the plots into ``study_dir``; returns their paths.

  Reads only the run workdirs (see the module docstring). Plots are skipped when ``plots`` is
  false, and, with a note in ``results.md``, when matplotlib is not installed.
  """
  study = load(study_dir)
  notes = list(study.notes)
  table = results(study)
  draw_plots, written, plots = plots, [], []
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if draw_plots:
      notes.append("No plots: matplotlib is not installed (pip install -e '.[study]').")
    draw_plots = False
  if draw_plots:
    for name, draw in (
        ('reliability.png', lambda p: _plot_reliability(study, p, notes)),
        ('curves.png', lambda p: _plot_curves(study, p)),
        ('train_loss.png', lambda p: _plot_train_loss(study, p)),
        ('bars.png', lambda p: _plot_bars(study, table, p)),
    ):
      if study.runs and draw(os.path.join(study_dir, name)):
        plots.append(name)
      elif os.path.exists(os.path.join(study_dir, name)):  # an earlier report's, now stale
        os.remove(os.path.join(study_dir, name))
  for note in notes:
    log.warning('%s', note)
  for name, text in (
      ('results.md', markdown(study, table, plots, notes)),
      ('results.csv', csv_text(table)),
  ):
    with open(os.path.join(study_dir, name), 'w') as f:
      f.write(text)
    written.append(os.path.join(study_dir, name))
  return written + [os.path.join(study_dir, p) for p in plots]


def main(argv: list[str]) -> int:
  if len(argv) != 2 or not os.path.isdir(argv[1]):
    print('usage: python -m skd_jax.study_report STUDY_DIR', file=sys.stderr)
    return 2
  logging.basicConfig(level=logging.INFO, format='%(message)s')
  for path in write_report(argv[1]):
    print(path)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
