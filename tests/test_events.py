"""TensorBoard event files: every record's scalars once, following metrics.jsonl through resumes.

A real run interrupted and resumed is checked in tests/test_faults.py (``_assert_same_run``).
"""

import os

import ml_collections
import pytest

import runs
from skd_jax import events
from skd_jax import workdir as workdir_lib


def _train(step, loss):
  return {
      'kind': 'train',
      'step': step,
      'epoch': step / 4,
      'loss': loss,
      'loss/ce': loss,
      'lr': 0.1,
  }


def test_scalars_tag_numbers_by_kind_and_leave_out_lists_and_coordinates():
  record = {
      'kind': 'eval',
      'step': 8,
      'epoch': 2.0,
      'top1': 91.5,
      'ema/ece': 1.25,
      'reliability': {'count': [1, 2], 'accuracy': [0.5, 1.0]},
      'finite': True,
  }
  assert events.scalars(record) == {'eval/top1': 91.5, 'eval/ema/ece': 1.25}


def test_a_restart_rewrites_the_events_from_the_records_kept(tmp_path):
  config = ml_collections.ConfigDict({'seed': 0})
  workdir = workdir_lib.Workdir(str(tmp_path), config, is_main=True)
  workdir.begin(0)
  first = [_train(2, 2.5), _train(4, 2.0), {'kind': 'eval', 'step': 4, 'epoch': 1.0, 'top1': 40.0}]
  for record in first + [_train(6, 1.75)]:
    workdir.log(record)
  assert events.read(workdir.tensorboard) == runs.event_scalars(first + [_train(6, 1.75)])
  before = os.listdir(workdir.tensorboard)

  resumed = workdir_lib.Workdir(str(tmp_path), config, is_main=True)
  resumed.begin(4)  # the checkpoint at step 4: the record of step 6 is undone
  resumed.log(_train(6, 1.5))
  assert events.read(workdir.tensorboard) == runs.event_scalars(first + [_train(6, 1.5)])
  (name,) = os.listdir(workdir.tensorboard)
  assert name not in before and name > before[0]  # a new file, read after the old by TensorBoard

  other = workdir_lib.Workdir(str(tmp_path), config, is_main=False)  # processes other than 0
  other.begin(0)
  other.log(_train(2, 9.0))
  assert os.listdir(workdir.tensorboard) == [name]
  assert events.read(workdir.tensorboard) == runs.event_scalars(first + [_train(6, 1.5)])


def test_a_damaged_event_file_is_reported_with_its_byte(tmp_path):
  data = events.header(0.0) + events.encode(_train(2, 1.0), 0.0)
  (tmp_path / events.file_name(1)).write_bytes(data[:-3])
  with pytest.raises(ValueError, match='torn record at byte'):
    events.read(tmp_path)
