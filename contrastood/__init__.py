"""contrastood: contrastive training for out-of-distribution detection (Winkens et al. 2020)."""

from contrastood import host_memory as _host_memory

# Before anything starts JAX's CPU client: glibc must reuse XLA:CPU's freed step buffers (host_memory).
_host_memory.configure()

__version__ = "0.1.0"
