"""TensorBoard event files of a run's records, written and read without TensorFlow.

An event file is TensorBoard's TFRecord stream of ``Event`` protocol buffers (the messages of
tensorboardX, which needs protobuf only). Each record of ``metrics.jsonl`` becomes one event at the
record's step holding every scalar of the record, tagged by its kind: ``train/loss``,
``train/loss/ce``, ``train/lr``, ``train/grad_norm``, ``eval/top1``, ``eval/ema/ece``,
``eval/train_seconds``... ``kind``, ``step`` and ``epoch`` are the event's coordinates, not
scalars, and values that are not numbers (the reliability bins) are left out.

``skd_jax.workdir`` keeps the files in ``WORKDIR/tensorboard/`` equal to ``metrics.jsonl``;
:func:`read` reads them back. Records carry no wall-clock time, so an event's is the time it was
written: events rewritten when a run resumes all carry the time of the rewrite.
"""

import re
import struct
from typing import Any

from etils import epath

FOLDER = 'tensorboard'  # in the workdir
_SKIPPED = ('kind', 'step', 'epoch')
_NAME = re.compile(r'^events\.out\.tfevents\.(\d+)\.skd_jax$')


def file_name(serial: int) -> str:
  """The name of the event file numbered ``serial``: TensorBoard reads files in name order, and
  needs ``tfevents`` in the name."""
  return f'events.out.tfevents.{serial:020d}.skd_jax'


def serial(name: str) -> int | None:
  """The number in an event file's name written by :func:`file_name` (None for other files)."""
  match = _NAME.match(name)
  return int(match.group(1)) if match else None


def scalars(record: dict[str, Any]) -> dict[str, float]:
  """``{tag: value}`` of the record's numbers (bools and lists aside), tagged ``KIND/KEY``."""
  return {
      f'{record["kind"]}/{k}': float(v)
      for k, v in record.items()
      if k not in _SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)
  }


def _frame(data: bytes) -> bytes:
  """One TFRecord: length, its masked CRC-32C, the data, its masked CRC-32C."""
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  header = struct.pack('<Q', len(data))
  return (
      header
      + struct.pack('<I', masked_crc32c(header))
      + data
      + struct.pack('<I', masked_crc32c(data))
  )


def header(wall_time: float) -> bytes:
  """The event every file starts with: the format's version."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  return _frame(
      event_pb2.Event(wall_time=wall_time, file_version='brain.Event:2').SerializeToString()
  )


def encode(record: dict[str, Any], wall_time: float) -> bytes:
  """``record`` (a line of ``metrics.jsonl``) as one framed event; empty if it has no scalars."""
  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2
  from tensorboardX.proto import summary_pb2

  # pylint: enable=g-import-not-at-top
  values = scalars(record)
  if not values:
    return b''
  summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=t, simple_value=v) for t, v in values.items()]
  )
  event = event_pb2.Event(wall_time=wall_time, step=int(record['step']), summary=summary)
  return _frame(event.SerializeToString())


def _records(data: bytes, name: str):
  from tensorboardX.record_writer import masked_crc32c  # pylint: disable=g-import-not-at-top

  offset = 0
  while offset < len(data):
    if offset + 12 > len(data):
      raise ValueError(f'{name}: a record torn at byte {offset}')
    header_ = data[offset : offset + 8]
    (length,) = struct.unpack('<Q', header_)
    (crc,) = struct.unpack('<I', data[offset + 8 : offset + 12])
    body = data[offset + 12 : offset + 12 + length]
    end = offset + 12 + length + 4
    if crc != masked_crc32c(header_) or len(body) < length or end > len(data):
      raise ValueError(f'{name}: a damaged or torn record at byte {offset}')
    (body_crc,) = struct.unpack('<I', data[end - 4 : end])
    if body_crc != masked_crc32c(body):
      raise ValueError(f'{name}: a record whose data does not match its checksum at byte {offset}')
    yield body
    offset = end


def read(directory: str | epath.PathLike) -> list[tuple[int, str, float]]:
  """``(step, tag, value)`` of every scalar in the event files of ``directory``, in file order.

  Reads every file whose name holds ``tfevents``, in name order as TensorBoard does, and checks
  every record's checksums (ValueError names the file and the byte). Values are float32, as
  TensorBoard stores them.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  found = []
  directory = epath.Path(directory)
  for file in sorted(directory.iterdir(), key=lambda p: p.name):
    if 'tfevents' not in file.name:
      continue
    for body in _records(file.read_bytes(), str(file)):
      event = event_pb2.Event.FromString(body)
      if event.HasField('summary'):
        found.extend((event.step, v.tag, v.simple_value) for v in event.summary.value)
  return found
