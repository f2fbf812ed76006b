"""Fused, multithreaded CPU kernels in C (``pipeline/_native.c``, OpenMP), called through ctypes.

scipy.ndimage runs each 1-D pass single-threaded, in float64, with a full
volume of temporaries per pass. These kernels work plane by plane (a 256×256
float32 plane fits in L2), fuse the passes that can share a plane, accumulate
in float32, keep the accumulators in registers across taps (Gaussian and box
add mirrored taps before multiplying) and split the work over threads. Each
output voxel is computed by one thread in a fixed order, without fused
multiply-add (``-ffp-contract=off``), so results are identical whatever the
thread count or CPU: the tests compare the installed build with one made for
plain x86-64 (no AVX2) bit for bit. They agree with scipy.ndimage to ~1e-6
relative (tests compare every filter, mode and order).

The library is compiled when the package is installed (a C compiler with
OpenMP is needed; without one the package falls back to scipy.ndimage), so a
fresh process pays nothing to use it. Border modes follow scipy.ndimage.
C- and Fortran-ordered input is handled without a copy by working on the
C-ordered view, so Fortran input gives Fortran output (what NIfTI stores).
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import weakref

import numpy as np

from .errors import StaleKernelsError

MODE_CODES = {"reflect": 0, "mirror": 1, "nearest": 2, "wrap": 3, "constant": 4}
_HERE = os.path.dirname(os.path.abspath(__file__))


def _candidates() -> list[str]:
    """Libraries built from ``_native.c``, best first: this package's build for this interpreter,
    then its builds for other CPythons, then one found elsewhere on the import path.

    ctypes needs no Python ABI, only the platform, so a checkout built once (``pip install -e .``)
    also serves jobs that another interpreter runs on it, e.g. a Snakemake conda env's Python with
    the checkout on PYTHONPATH.
    """
    if path := os.environ.get("VOLFILTER_NATIVE_LIB"):  # another build (the tests load a baseline-x86-64 one)
        return [path]
    spec = importlib.util.find_spec("pipeline._native")
    own = spec.origin if spec is not None and spec.origin else None
    try:
        names = sorted(n for n in os.listdir(_HERE) if n.startswith("_native.") and n.endswith(".so"))
    except OSError:
        names = []
    local = [os.path.join(_HERE, n) for n in names]
    if own and os.path.dirname(os.path.abspath(own)) == _HERE:
        return [own] + [p for p in local if p != own]
    return local + ([own] if own else [])


def _source_sha256() -> str | None:
    """SHA-256 of the ``_native.c`` beside this file; None where there is none (an installed
    wheel whose library and code were built together)."""
    try:
        with open(os.path.join(_HERE, "_native.c"), "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()
    except FileNotFoundError:
        return None


def _check_source(lib, path: str, current: str | None) -> None:
    """Refuse a library built from another version of ``_native.c`` than ``current`` (a checkout
    updated without a rebuild: the library would be called with the new arguments)."""
    if current is None:
        return
    try:
        lib.vf_source_sha256.restype = ctypes.c_char_p
        built = lib.vf_source_sha256().decode()  # "" when built by hand, without setup.py
    except AttributeError:  # built before libraries recorded their source
        built = "older"
    if built and built != current:
        raise StaleKernelsError(
            f"{path} was built from another version of pipeline/_native.c; using scipy.ndimage instead "
            "(rebuild the kernels: pip install -e .)"
        )


def _load():
    """The first candidate that loads and was built from this source (else the first reason why not)."""
    errors = []
    current = _source_sha256()
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            _check_source(lib, path, current)
            return path, lib
        except (OSError, StaleKernelsError) as exc:
            errors.append(exc)
    for exc in errors:
        if isinstance(exc, StaleKernelsError):
            raise exc
    raise ImportError(str(errors[0]) if errors else "pipeline._native is not built")


_path, _lib = _load()

_F = ctypes.POINTER(ctypes.c_float)
_I = ctypes.c_int64
for _name, _args in {
    "vf_separable": [_F, _F, _I, _I, _I, _F, _I, _F, _I, _F, _I, ctypes.c_int],
    "vf_gradient": [_F, _F, _I, _I, _I, _F, _F, ctypes.c_int, ctypes.c_int],
    "vf_sharpen": [_F, _F, _I, _I, _I, ctypes.c_float, ctypes.c_int],
    "vf_correlate": [_F, _F, _I, _I, _I, _F, _I, _I, _I, ctypes.c_int],
}.items():
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = ctypes.c_int
_lib.vf_axpby.argtypes = [_F, _F, _F, _I, ctypes.c_float, ctypes.c_float]
_lib.vf_axpby.restype = None
_lib.vf_all_finite.argtypes = [_F, _I]
_lib.vf_all_finite.restype = ctypes.c_int
_lib.vf_fwhm_sums.argtypes = [_F, ctypes.c_void_p, _I, _I, _I, ctypes.POINTER(ctypes.c_double)]
_lib.vf_fwhm_sums.restype = ctypes.c_int
_lib.vf_finite_stats.argtypes = [_F, _I, ctypes.POINTER(ctypes.c_double)]
_lib.vf_finite_stats.restype = ctypes.c_int
_lib.vf_histogram.argtypes = [_F, _I, ctypes.POINTER(ctypes.c_double), _I, ctypes.POINTER(ctypes.c_int64)]
_lib.vf_histogram.restype = ctypes.c_int
_U8 = ctypes.POINTER(ctypes.c_uint8)
_lib.vf_missing_prepare.argtypes = [_F, _U8, _F, _F, _I]
_lib.vf_missing_prepare.restype = ctypes.c_int64
_lib.vf_fill_ring.argtypes = [_F, _F, _F, _F, _I]
_lib.vf_fill_ring.restype = ctypes.c_int64
_lib.vf_missing_finish.argtypes = [_F, _F, _F, _U8, _I]
_lib.vf_missing_finish.restype = None
_lib.vf_set_threads.argtypes = [ctypes.c_int]
_lib.vf_max_threads.restype = ctypes.c_int
_lib.vf_parallel_min.restype = ctypes.c_int64
_ALL_THREADS = _lib.vf_max_threads()
# A volume under this many voxels is filtered on the calling thread (splitting it costs more than
# it saves); a series of such volumes is split over threads by volume instead (filters.apply_filter).
PARALLEL_MIN = int(_lib.vf_parallel_min())


def threads() -> int:
    """The thread count in force (:func:`set_threads`)."""
    return _lib.vf_max_threads()


def set_threads(n: int | None) -> int:
    """Use ``n`` threads (None: all cores); returns the count in force."""
    _lib.vf_set_threads(_ALL_THREADS if n is None else max(1, int(n)))
    return threads()


def _p(a: np.ndarray):
    return a.ctypes.data_as(_F)


def _f32(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float32)


class NonFiniteInput(ValueError):
    """The input held NaN or infinity: the filter kernels check as they read and stop early.

    Not an error: :func:`pipeline.filters.filter_volume` then takes its missing-data path.
    """


def _check(rc: int) -> None:
    if rc == 1:
        raise NonFiniteInput("the input is not all finite")
    if rc != 0:
        raise MemoryError("native kernel could not allocate its plane buffers")


def _view(x, per_axis):
    """C-ordered view of a 3-D float32 array, its per-axis values in view order, and whether transposed."""
    if x.flags.c_contiguous:
        return x, tuple(per_axis), False
    if x.flags.f_contiguous:
        return x.T, tuple(per_axis)[::-1], True
    return np.ascontiguousarray(x), tuple(per_axis), False


ALIGN = 64  # bytes: one cache line


class _Output:
    """The owner of a kernel output's memory: the NumPy arrays over it keep it alive, and when the
    last of them is gone, its buffer goes to the pool that :func:`_empty` takes from."""

    __slots__ = ("__array_interface__", "raw", "__weakref__")


# Buffers of outputs nobody uses any more, for the next output of the same size. Only list.append,
# list.pop and list.clear touch it, each atomic under the GIL: arrays die, and give their buffer
# back, in any thread (the 4-D path filters volumes on several) and whenever a collection runs.
_POOL: list = []
POOL_MAX = 2  # 0: no reuse


def _give_back(raw) -> None:
    if len(_POOL) < POOL_MAX:
        _POOL.append(raw)


def release_buffers() -> None:
    """Free the output buffers kept for reuse (at most POOL_MAX volumes' worth)."""
    _POOL.clear()  # one call, atomic under the GIL like append and pop


def _buffer(size: int) -> np.ndarray:
    """A float32 buffer of ``size`` from the pool, else a new one; one of another size is dropped."""
    try:
        raw = _POOL.pop()
    except IndexError:
        raw = None
    return raw if raw is not None and raw.size == size else np.empty(size, np.float32)


def _empty(shape) -> np.ndarray:
    """An uninitialised C-ordered float32 array that starts on a cache line, for a kernel's output.

    NumPy's large arrays start 16 bytes into a page (glibc's chunk header), so each 64-byte run of
    an output row that a kernel stores straddles two cache lines. 256³ Gaussian of 21 taps, 2-core
    VM, a fresh output per call, 2 threads, 15 alternated pairs: paired ratios 0.933-0.951.

    The memory of an output that its caller has let go is reused for the next (see _POOL): a new
    64 MB array costs the first pass over it Linux's handing out and zeroing of 16,384 pages, 13 ms
    against 6 ms to fill one written before. 256³, 2 threads, 2-core VM, 8 alternated fresh
    processes, best of 7 calls each: Gaussian paired ratio 0.87 (median), Sobel 0.78, sharpen 0.67.
    """
    n = int(np.prod(shape))
    raw = _buffer(n + ALIGN // 4 - 1)  # float32 arrays start on 4 bytes at least
    skip = (-raw.ctypes.data % ALIGN) // 4
    owner = _Output()
    owner.raw = raw  # the whole buffer (the output starts up to 60 bytes in)
    owner.__array_interface__ = {
        "shape": (n,),
        "typestr": raw.dtype.str,
        "data": (raw.ctypes.data + 4 * skip, False),
        "version": 3,
    }
    weakref.finalize(owner, _give_back, raw)
    return np.asarray(owner).reshape(shape)


def _finish(out, transposed):
    return out.T if transposed else out


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's sampled, normalised Gaussian (radius ``int(truncate·σ + 0.5)``)."""
    r = int(truncate * float(sigma) + 0.5)
    d = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 / (float(sigma) ** 2) * d * d)
    return (w / w.sum()).astype(np.float32)


def separable(x, weights, mode="reflect"):
    """Correlate with one odd-length 1-D kernel per axis (a Gaussian, a box)."""
    v, w, t = _view(x, weights)
    wk, wj, wi = (_f32(a) for a in w)
    out = _empty(v.shape)
    _check(
        _lib.vf_separable(_p(v), _p(out), *v.shape, _p(wk), wk.size, _p(wj), wj.size, _p(wi), wi.size, MODE_CODES[mode])
    )
    return _finish(out, t)


def gaussian(x, sigma_vox, mode="reflect", truncate=4.0):
    return separable(x, [gaussian_weights(s, truncate) for s in sigma_vox], mode)


def box(x, size_vox, mode="reflect"):
    return separable(x, [np.full(int(n), 1.0 / int(n), np.float32) for n in size_vox], mode)


def gradient(x, scale_per_axis, axis, smooth, mode="reflect"):
    """Sobel (smooth=(1,2,1)) or Prewitt (1,1,1); ``axis`` 0/1/2 or 'magnitude'; result × scale."""
    v, scale, t = _view(x, scale_per_axis)
    which = 3 if axis == "magnitude" else ((2 - int(axis)) if t else int(axis))  # view axes reversed for F input
    out = _empty(v.shape)
    _check(_lib.vf_gradient(_p(v), _p(out), *v.shape, _p(_f32(smooth)), _p(_f32(scale)), which, MODE_CODES[mode]))
    return _finish(out, t)


def sharpen(x, amount, mode="reflect"):
    v, _, t = _view(x, (0, 0, 0))
    out = _empty(v.shape)
    _check(_lib.vf_sharpen(_p(v), _p(out), *v.shape, float(amount), MODE_CODES[mode]))
    return _finish(out, t)


def correlate(x, kernel, mode="reflect"):
    v, _, t = _view(x, (0, 0, 0))
    k = np.asarray(kernel, np.float32)
    k = _f32(k.transpose((2, 1, 0)) if t else k)
    out = _empty(v.shape)
    _check(_lib.vf_correlate(_p(v), _p(out), *v.shape, _p(k), *k.shape, MODE_CODES[mode]))
    return _finish(out, t)


def all_finite(x) -> bool:
    """True when the float32 array ``x`` (C or Fortran contiguous) holds no NaN or infinity."""
    v, _, _ = _view(x, (0, 0, 0))
    return bool(_lib.vf_all_finite(_p(v), v.size))


def fwhm_sums(x, mask=None):
    """Sums of Forman's smoothness estimator over the valid voxels of a 3-D float32 volume.

    Returns ``(n, ss, d2, pairs)``: the number of valid voxels (finite, inside ``mask``), the sum of
    their squared deviations from their mean, and per array axis the sum of squared first
    differences over pairs of valid neighbours and the number of pairs.
    """
    v, _, t = _view(x, (0, 0, 0))
    m = None
    if mask is not None:
        m = np.ascontiguousarray(mask.T if t else mask, dtype=np.uint8)
        if m.shape != v.shape:
            raise ValueError(f"mask shape {mask.shape} differs from the volume's {x.shape}")
    out = np.zeros(8, np.float64)
    _check(
        _lib.vf_fwhm_sums(
            _p(v), None if m is None else m.ctypes.data, *v.shape, out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))
        )
    )
    d2, pairs = out[2:5], out[5:8]
    if t:  # view axes run backwards
        d2, pairs = d2[::-1], pairs[::-1]
    return int(out[0]), float(out[1]), [float(d) for d in d2], [int(c) for c in pairs]


def finite_stats(x) -> tuple[int, int, float, float, float, float]:
    """Of a contiguous float32 array of any shape: ``(n, nan_count, min, max, mean, ss)``, where n
    is the number of finite voxels, min, max and mean are theirs (mean NaN when n is 0) and ss is the
    sum of their squared deviations from the mean. Sums in double, the same bits for any thread count."""
    v = x.ravel(order="K")
    out = np.zeros(6, np.float64)
    _check(_lib.vf_finite_stats(_p(v), v.size, out.ctypes.data_as(ctypes.POINTER(ctypes.c_double))))
    return int(out[0]), int(out[1]), float(out[2]), float(out[3]), float(out[4]), float(out[5])


def histogram(x, edges) -> np.ndarray:
    """``np.histogram(x, bins=edges)[0]`` for a contiguous float32 array and increasing edges (int64)."""
    v = x.ravel(order="K")
    e = np.ascontiguousarray(edges, dtype=np.float64)
    counts = np.zeros(e.size - 1, np.int64)
    _check(
        _lib.vf_histogram(
            _p(v),
            v.size,
            e.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
            counts.size,
            counts.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
        )
    )
    return counts


def axpby(x, y, a, b):
    """a·x + b·y in the memory order of ``y`` (both float32, same shape)."""
    vy, _, t = _view(y, (0, 0, 0))
    vx = np.ascontiguousarray(x.T if t else x, dtype=np.float32)
    out = _empty(vy.shape)
    _lib.vf_axpby(_p(vx), _p(vy), _p(out), out.size, float(a), float(b))
    return _finish(out, t)


# Missing data (pipeline.filters.filter_volume): the NumPy steps as single passes in C, same results.


def _order(a: np.ndarray) -> str:
    """The memory order the flat passes walk ``a`` in: "F" for a Fortran-ordered array, else "C"."""
    return "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"


def _flat(a: np.ndarray, order: str) -> np.ndarray:
    """The voxels of ``a`` as one run in ``order`` (a view: the callers pass arrays laid out so)."""
    flat = a.ravel(order=order)
    if a.size and not np.shares_memory(flat, a):
        raise ValueError("array is not contiguous in the expected order")
    return flat


def _mask_flat(mask, shape, order):
    """A pointer to ``mask``'s bytes in ``order`` (None without a mask); it keeps the array alive."""
    if mask is None:
        return None
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {shape}")
    m = np.asarray(mask, dtype=bool, order=order)
    return _flat(m.view(np.uint8), order).ctypes.data_as(_U8)


def missing_prepare(x, mask=None):
    """``(w, filled, n_valid)`` for a contiguous 3-D float32 ``x``: valid = finite and inside
    ``mask``; ``w`` = valid as 1.0/0.0, ``filled`` = x where valid else 0, both in x's memory order."""
    order = _order(x)
    x = np.asarray(x, dtype=np.float32, order=order)
    w = np.empty(x.shape, np.float32, order=order)
    filled = np.empty(x.shape, np.float32, order=order)
    m = _mask_flat(mask, x.shape, order)
    n = _lib.vf_missing_prepare(_p(_flat(x, order)), m, _p(_flat(w, order)), _p(_flat(filled, order)), x.size)
    return w, filled, int(n)


def fill_ring(filled, w, count, total) -> int:
    """In place: where ``w`` is 0 and ``count`` > 0, ``filled`` = total / count and ``w`` = 1
    (all four float32, same shape and memory order). Returns how many voxels were filled."""
    order = _order(filled)
    count = np.asarray(count, dtype=np.float32, order=order)
    total = np.asarray(total, dtype=np.float32, order=order)
    flats = [_flat(a, order) for a in (filled, w, count, total)]
    return int(_lib.vf_fill_ring(*(_p(f) for f in flats), filled.size))


def missing_finish(out, x, mask=None, den=None) -> None:
    """In place on ``out``: divide by ``den`` (when given), NaN where ``x`` is not finite, 0 outside
    ``mask`` (when given)."""
    order = _order(out)
    x = np.asarray(x, dtype=np.float32, order=order)
    m = _mask_flat(mask, out.shape, order)
    d = None if den is None else _p(_flat(np.asarray(den, dtype=np.float32, order=order), order))
    _lib.vf_missing_finish(_p(_flat(out, order)), d, _p(_flat(x, order)), m, out.size)
