"""CPU (numpy/scipy) versus GPU (CuPy/cupyx) array namespaces.

This is the only module that imports CuPy, and only on demand. Filters never
ask for a backend by name: they take ``xp, ndi = namespace(array)`` from the
array they were handed, so one code path serves both devices.

Examples
--------
>>> import numpy as np
>>> xp, ndi = namespace(np.zeros(3))
>>> xp.__name__, ndi.gaussian_filter.__module__.startswith('scipy.ndimage')
('numpy', True)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass

import numpy as np

from .errors import VolfilterError

BACKENDS = ("auto", "cpu", "gpu")


@functools.cache
def _cupy():
    """Import CuPy and check that a device really works; return None if not."""
    if os.environ.get("VOLFILTER_DISABLE_GPU"):
        return None
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        # A tiny round trip proves the driver, runtime and device agree.
        if int((cupy.arange(3, dtype=cupy.float32) + 1).sum().get()) != 6:
            return None
        return cupy
    except Exception:  # ImportError, CUDA driver/runtime errors, no device
        return None


# Below this many voxels per call the numba kernels do not pay for themselves in a fresh process:
# importing numba and loading the cached kernels costs ~1.4 s (measured, bench/), about what
# scipy.ndimage spends on three filters of 4 M voxels. The choice depends on the call's size
# alone, so the same input always takes the same path (and gives the same bytes).
FAST_CPU_MIN_VOXELS = 4_000_000
_kernels = None
_use_fast = contextvars.ContextVar("volfilter_use_fast_cpu", default=None)


def cpu_kernels():
    """Load and return the numba kernels (:mod:`pipeline.cpu_kernels`), or None without numba.

    ``VOLFILTER_NO_NUMBA=1`` forces the plain scipy.ndimage path.
    """
    global _kernels
    if _kernels is None and not os.environ.get("VOLFILTER_NO_NUMBA"):
        try:
            from . import cpu_kernels as kernels
        except ImportError:
            return None
        _kernels = kernels
    return _kernels


@contextlib.contextmanager
def cpu_path_for(n_voxels: int):
    """Within the block, CPU filters use the numba kernels if a call of ``n_voxels`` gains from them.

    An enclosing block's choice stands (a series streamed volume by volume is sized as a whole).
    """
    if _use_fast.get() is not None:
        yield
        return
    token = _use_fast.set(n_voxels >= FAST_CPU_MIN_VOXELS and cpu_kernels() is not None)
    try:
        yield
    finally:
        _use_fast.reset(token)


def set_cpu_threads(n: int | None) -> None:
    """Threads for the CPU kernels (results do not depend on it)."""
    global _threads
    _threads = n
    if _kernels is not None and n is not None:
        _kernels.set_threads(n)


_threads = None


def fast_cpu(array):
    """The numba kernels if chosen for this call and ``array`` is a 3-D float32 NumPy array, else None."""
    if _use_fast.get() and isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 3:
        if _threads is not None:
            _kernels.set_threads(_threads)
        return _kernels
    return None


def gpu_available() -> bool:
    """True when CuPy imports and a CUDA device answers."""
    return _cupy() is not None


@dataclass(frozen=True)
class Backend:
    """A resolved backend: its name and how to move arrays to and from it."""

    name: str

    def to_device(self, array: np.ndarray):
        if self.name == "gpu":
            return _cupy().asarray(array)
        return array

    def to_host(self, array) -> np.ndarray:
        if self.name == "gpu":
            return _cupy().asnumpy(array)
        return np.asarray(array)


def resolve(name: str = "auto") -> Backend:
    """Turn ``auto|cpu|gpu`` into a working backend.

    ``auto`` silently falls back to the CPU; ``gpu`` without CuPy or a device
    raises :class:`VolfilterError`.
    """
    if name not in BACKENDS:
        raise VolfilterError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cpu":
        return Backend("cpu")
    if gpu_available():
        return Backend("gpu")
    if name == "gpu":
        raise VolfilterError(
            "backend 'gpu' requested but CuPy or a CUDA device is not available; "
            "install the 'gpu' extra (pip install 'volfilter[gpu]') or use --backend cpu"
        )
    return Backend("cpu")


class _LazyNdimage:
    """scipy.ndimage, imported on first use (0.4 s that numba and GPU jobs need not pay)."""

    def __getattr__(self, name):
        import scipy.ndimage

        return getattr(scipy.ndimage, name)


_NDIMAGE = _LazyNdimage()


def namespace(array):
    """Return ``(xp, ndi)``: the array module and its ndimage for ``array``."""
    if isinstance(array, np.ndarray):
        return np, _NDIMAGE
    cupy = _cupy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        import cupyx.scipy.ndimage

        return cupy, cupyx.scipy.ndimage
    raise TypeError(f"unsupported array type {type(array).__name__}")
