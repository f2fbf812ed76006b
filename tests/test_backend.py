"""Moves between host and device, checked without a GPU against a stand-in with CuPy's documented
defaults (the GPU tests check the same on a device)."""

import numpy as np
from numpy.testing import assert_array_equal

from pipeline import backend


class _CupyStandIn:
    """The part of CuPy that Backend uses; ``asnumpy`` downloads in C order unless told otherwise,
    as ``cupy.asnumpy(a, stream=None, order='C', out=None)`` does."""

    @staticmethod
    def asarray(a):
        return np.array(a, order="K")

    @staticmethod
    def asfortranarray(a):
        return np.asfortranarray(a)

    @staticmethod
    def asnumpy(a, stream=None, order="C", out=None):
        return np.array(a, order=order)


def test_gpu_results_reach_the_host_in_nifti_order(monkeypatch, rng):
    # cupyx.scipy.ndimage gives C-ordered results; the NIfTI writer needs Fortran order and
    # would otherwise transpose each result on the host (~0.3 s per 256^3 volume).
    monkeypatch.setattr(backend, "_cupy", lambda: _CupyStandIn)
    gpu = backend.Backend("gpu")
    result_on_device = np.ascontiguousarray(rng.normal(size=(6, 5, 4)).astype(np.float32))
    host = gpu.to_host(result_on_device)
    assert host.flags.f_contiguous and host.dtype == np.float32
    assert_array_equal(host, result_on_device)


def test_cpu_to_host_keeps_the_array(rng):
    x = np.asfortranarray(rng.normal(size=(6, 5, 4)).astype(np.float32))
    assert backend.Backend("cpu").to_host(x) is x
