"""The compiled kernels equal scipy.ndimage (the plain path) and do not depend on the thread count."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from pipeline import apply_filter
from pipeline.backend import cpu_kernels
from pipeline.filters import FILTERS, MODES

fast = cpu_kernels()
pytestmark = pytest.mark.skipif(fast is None, reason="pipeline._native was not built (no C compiler at install)")

VOX = (1.0, 1.5, 2.5)


def _params(name, tmp_path):
    if name == "gaussian":
        return {"fwhm_mm": 4.0}
    if name == "kernel":
        np.save(tmp_path / "k.npy", np.arange(3 * 5 * 3, dtype=float).reshape(3, 5, 3) - 20)
        return {"kernel_file": str(tmp_path / "k.npy")}
    return {}


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_fast_path_equals_scipy_path(name, mode, order, rng, tmp_path, monkeypatch):
    x = np.asarray(rng.normal(100, 30, (19, 16, 13)).astype(np.float32), order=order)
    params = _params(name, tmp_path)
    ours = apply_filter(x, VOX, name, mode=mode, **params)
    import pipeline.filters as filters

    monkeypatch.setattr(filters, "fast_cpu", lambda a: None)
    ref = apply_filter(x, VOX, name, mode=mode, **params)
    scale = float(np.abs(ref).max())
    assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    if name != "identity":
        assert ours.flags.f_contiguous == (order == "F")  # Fortran in, Fortran out: no transpose on save


@pytest.mark.parametrize("name", ["gaussian", "sobel", "sharpen", "emboss"])
def test_results_identical_whatever_the_thread_count(name, rng):
    x = np.asfortranarray(rng.normal(size=(40, 36, 30)).astype(np.float32))
    params = {"fwhm_mm": 5.0} if name == "gaussian" else {}
    outs = []
    for n in (1, 2, 3):
        fast.set_threads(n)
        outs.append(apply_filter(x, VOX, name, **params))
    fast.set_threads(None)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def _scipy_separable(x, weights, mode):
    import scipy.ndimage as ndi

    out = x.astype(np.float64)
    for axis, w in enumerate(weights):
        out = ndi.correlate1d(out, np.asarray(w, np.float64), axis=axis, mode=mode)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(37, 45, 70), (5, 33, 17), (24, 1, 40)])
def test_separable_kernel_equals_scipy_correlate1d(mode, shape, rng):
    """Odd row counts (the row-pair code's leftover), widths off the 8/16/32 blocks, kernels longer than an axis."""
    x = rng.normal(100, 30, shape).astype(np.float32)
    cases = [
        [fast.gaussian_weights(2.5), fast.gaussian_weights(1.2), fast.gaussian_weights(3.3)],  # symmetric
        [np.array([0.1, 0.5, 0.2], np.float32), np.array([1.0], np.float32), np.array([0.3, 0.3, -0.4, 1.0, 0.2])],
    ]
    for weights in cases:
        ours = fast.separable(x, weights, mode)
        ref = _scipy_separable(x, weights, mode)
        assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_portable_code_gives_the_same_bits_as_the_vector_code(mode, rng):
    """What a CPU without AVX2+FMA computes (software fmaf) is bit-identical to the vectorised path."""
    x = rng.normal(size=(21, 34, 51)).astype(np.float32)
    weights = [fast.gaussian_weights(s) for s in (1.7, 2.2, 0.9)]
    vector = fast.separable(x, weights, mode)
    fast.force_portable(True)
    try:
        assert not fast.fast_separable()
        portable = fast.separable(x, weights, mode)
    finally:
        fast.force_portable(False)
    assert np.array_equal(vector, portable)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
@pytest.mark.parametrize("order", ["C", "F"])
def test_all_finite_equals_numpy(bad, order, rng):
    x = np.asarray(rng.normal(size=(33, 70, 41)).astype(np.float32), order=order)
    x[5, 7, 9] = 3.4e38  # large but finite
    if bad is not None:
        x[32, 69, 40] = bad  # the very last element, in the last block
    assert fast.all_finite(x) == bool(np.isfinite(x).all())
    if bad is not None:
        x[32, 69, 40] = 0
        x[0, 0, 0] = bad
        assert not fast.all_finite(x)
