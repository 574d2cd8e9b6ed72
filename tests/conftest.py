"""Every test process sees 8 fake CPU devices; 1-device runs pick the first of them.

Compilation is most of the suite's time (its programs are tiny and run for a few steps), so the
tests have XLA's CPU backend hand its code to LLVM at -O0 (``--xla_backend_optimization_level=0``,
inherited by the command-line runs the tests start): a quick PS-KD run on 8 devices took 10 s
instead of 17-20 s, the whole suite 33 minutes instead of 42 on a 2-core CPU. XLA's own program
optimisations are the same; the machine code is not, and a float32 result can differ in its last
bits (one loss of test_startup.py's seed test by 1.5e-5 relative): every comparison within the
suite is between programs compiled alike, and the one test against numbers recorded from default
compilation (that one) runs at the default. An ``XLA_FLAGS`` that already sets the level keeps its
own: ``XLA_FLAGS=--xla_backend_optimization_level=3 pytest tests`` (XLA's default) runs the suite
as users compile.

The tests build the same train and evaluation steps many times (a run and its resumption, the
same config on several tests), so the suite shares one persistent compilation cache, removed at
the end. Only this process uses it. The command-line runs the tests start have their own
persistent cache (``skd_jax.compilation_cache``) off unless a test turns it on: test_startup.py
tests it, and test_main.py, test_multiprocess.py and test_study.py run with a folder of their
own, as users' runs have it on by default (in a run of several processes only process 0 writes
it, so a rerun's processes find the same programs there).
"""

import atexit
import os
import shutil
import tempfile

_FLAGS = os.environ.get('XLA_FLAGS', '')
if 'xla_backend_optimization_level' not in _FLAGS:
  os.environ['XLA_FLAGS'] = f'{_FLAGS} --xla_backend_optimization_level=0'.strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_num_cpu_devices', 8)

_CACHE = tempfile.mkdtemp(prefix='skd_jax_tests_xla_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
os.environ['SKD_JAX_COMPILATION_CACHE'] = 'off'  # inherited by the command-line runs
