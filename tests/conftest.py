"""Every test process sees 8 fake CPU devices; 1-device runs pick the first of them."""

import jax

jax.config.update('jax_num_cpu_devices', 8)
