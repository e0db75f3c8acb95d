"""portassm: Mamba's selective state space model on every array library.

One API (:func:`scan`, :func:`scan_vjp`, :func:`scan_with_vjp`, :func:`scan_step`,
:func:`discretize`, :func:`causal_conv1d`, :func:`mamba_block` and its step form) over a
NumPy reference, a Numba CPU backend, a CuPy CUDA backend and a Torch + Triton backend.
Choose one with :func:`set_backend`, :func:`use_backend` or the ``PORTASSM_BACKEND``
environment variable.
"""

from .backend import Backend, available_backends, get_backend, set_backend, use_backend
from .block import init_block_cache, init_block_params, mamba_block, mamba_block_step
from .model import MambaConfig, MambaLM
from .errors import BackendUnavailableError, ShapeError
from .ops import (
    ScanGrads, causal_conv1d, causal_conv1d_step, discretize, scan, scan_step, scan_vjp, scan_with_vjp,
)

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendUnavailableError", "MambaConfig", "MambaLM", "ScanGrads", "ShapeError", "__version__",
    "available_backends", "causal_conv1d", "causal_conv1d_step", "discretize", "get_backend",
    "init_block_cache", "init_block_params", "mamba_block", "mamba_block_step", "scan",
    "scan_step", "scan_vjp", "scan_with_vjp", "set_backend", "use_backend",
]
