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

import functools
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import StaleKernelsError, VolfilterError

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


_native = None


def cpu_kernels():
    """The compiled CPU kernels (:mod:`pipeline.native`), or None where they were not built.

    ``VOLFILTER_NO_NATIVE=1`` forces the plain scipy.ndimage path.
    """
    global _native
    if os.environ.get("VOLFILTER_NO_NATIVE"):
        return None
    if _native is None:
        _native = False  # tried once per process: a failed import is not retried per filter
        try:
            from . import native
        except StaleKernelsError as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
        except (ImportError, OSError):
            pass
        else:
            _native = native
    return _native or None


def set_cpu_threads(n: int | None) -> None:
    """Threads for the CPU kernels (results do not depend on it)."""
    kernels = cpu_kernels()
    if kernels is not None:
        kernels.set_threads(n)


def fast_cpu(array):
    """The compiled kernels if built and ``array`` is a 3-D float32 NumPy array, else None."""
    if isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim == 3:
        return cpu_kernels()
    return None


def fast_cpu_flat(array):
    """The compiled kernels if built and ``array`` is a contiguous float32 NumPy array of any shape
    (for the passes that see it as one run of voxels: finiteness, histograms), else None."""
    contiguous = isinstance(array, np.ndarray) and (array.flags.c_contiguous or array.flags.f_contiguous)
    if contiguous and array.dtype == np.float32:
        return cpu_kernels()
    return None


def has_finite(array: np.ndarray) -> bool:
    """True when any voxel is finite; one pass in C without a mask array in the common all-finite case."""
    fast = fast_cpu_flat(array)
    if fast is not None and array.size and fast.all_finite(array):
        return True
    return bool(np.isfinite(array).any())


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

    def staging(self, shape):
        """A host buffer for :meth:`to_host` to download float32 volumes of ``shape`` into, to be
        reused by a stream of downloads: page-locked on the GPU, None on the CPU (nothing moves)
        or when the host cannot page-lock that much.

        A download into pageable memory took 23.7 ms per 64 MB on an H100 host (2.7 GB/s, measured
        by bench/bench.py), three times per volume for three filters.
        """
        if self.name != "gpu":
            return None
        import cupyx

        cupy = _cupy()
        try:
            return cupyx.empty_pinned(tuple(shape), np.float32, order="F")
        except (cupy.cuda.memory.OutOfMemoryError, cupy.cuda.runtime.CUDARuntimeError):
            return None  # no page-locked memory to spare: download to pageable memory, as before

    def to_host(self, array, out=None) -> np.ndarray:
        """A NumPy array; from the GPU in Fortran order, NIfTI's, into ``out`` when it fits
        (a :meth:`staging` buffer, overwritten by the next download into it).

        cupyx.scipy.ndimage returns C-ordered results (also for Fortran-ordered input) and
        ``cupy.asnumpy`` downloads in C order by default, so the NIfTI writer had to transpose
        every result on the host: ~0.3 s for a 256³ float32 volume on one core (measured here),
        per filter. The device transposes it before a contiguous download instead.
        """
        if self.name == "gpu":
            cupy = _cupy()
            array = cupy.asfortranarray(array)
            if out is not None and out.shape == array.shape and out.dtype == array.dtype:
                return array.get(out=out)
            return cupy.asnumpy(array, order="F")
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
    """scipy.ndimage, imported on first use (0.4 s that native-kernel and GPU jobs need not pay)."""

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
