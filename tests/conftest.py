"""Every test process sees 8 fake CPU devices; 1-device runs pick the first of them.

The tests build the same train and evaluation steps many times (a run and its resumption, the
same config on several tests), so the suite shares one persistent compilation cache, removed at
the end. Only this process uses it: the command-line runs the tests start compile on their own,
so that the two processes of a distributed run reach their first collective together: their own
persistent cache (``skd_jax.compilation_cache``) is off unless a test turns it on.
"""

import atexit
import os
import shutil
import tempfile

import jax

jax.config.update('jax_num_cpu_devices', 8)

_CACHE = tempfile.mkdtemp(prefix='skd_jax_tests_xla_cache_')
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
os.environ['SKD_JAX_COMPILATION_CACHE'] = 'off'  # inherited by the command-line runs
