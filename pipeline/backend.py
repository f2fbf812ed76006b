"""CPU (numpy/scipy) versus GPU (CuPy/cupyx) array namespaces.

This is the only module that imports CuPy, and only on demand. Filters never
ask for a backend by name: they take ``xp, ndi = namespace(array)`` from the
array they were handed, so one code path serves both devices.

Examples
--------
>>> import numpy as np
>>> xp, ndi = namespace(np.zeros(3))
>>> xp.__name__, ndi.__name__
('numpy', 'scipy.ndimage')
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import scipy.ndimage

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


@functools.cache
def cpu_kernels():
    """The numba kernels module (:mod:`pipeline.cpu_kernels`), or None without numba.

    ``VOLFILTER_NO_NUMBA=1`` forces the plain scipy.ndimage path.
    """
    if os.environ.get("VOLFILTER_NO_NUMBA"):
        return None
    try:
        from . import cpu_kernels as kernels
    except ImportError:
        return None
    return kernels


def set_cpu_threads(n: int | None) -> None:
    """Threads for the CPU kernels (results do not depend on it)."""
    kernels = cpu_kernels()
    if kernels is not None and n is not None:
        kernels.set_threads(n)


def fast_cpu(array):
    """The numba kernels if ``array`` is a float32 NumPy array and numba is usable, else None."""
    if isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 3:
        return cpu_kernels()
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


def namespace(array):
    """Return ``(xp, ndi)``: the array module and its ndimage for ``array``."""
    if isinstance(array, np.ndarray):
        return np, scipy.ndimage
    cupy = _cupy()
    if cupy is not None and isinstance(array, cupy.ndarray):
        import cupyx.scipy.ndimage

        return cupy, cupyx.scipy.ndimage
    raise TypeError(f"unsupported array type {type(array).__name__}")
