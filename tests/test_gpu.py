"""GPU (CuPy) results equal the CPU path to 1e-5 relative. Skipped without CuPy and a device."""

import numpy as np
import pytest
from numpy.testing import assert_allclose

from pipeline import apply_filter, filter_image
from pipeline.backend import resolve
from pipeline.filters import FILTERS, MODES

pytestmark = pytest.mark.gpu

VOX = (1.0, 1.5, 2.5)


def _params(name, tmp_path):
    if name == "gaussian":
        return {"fwhm_mm": 4.0}
    if name == "kernel":
        np.save(tmp_path / "k.npy", np.arange(27.0).reshape(3, 3, 3) - 13)
        return {"kernel_file": str(tmp_path / "k.npy")}
    return {}


def _compare(cpu, gpu):
    scale = float(np.nanmax(np.abs(cpu))) or 1.0
    assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("mode", MODES)
def test_gpu_equals_cpu(name, mode, rng, tmp_path):
    import cupy

    x = rng.normal(100, 30, (24, 21, 17)).astype(np.float32)
    params = _params(name, tmp_path)
    cpu = apply_filter(x, VOX, name, mode=mode, **params)
    gpu = apply_filter(cupy.asarray(x), VOX, name, mode=mode, **params)
    assert isinstance(gpu, cupy.ndarray) and gpu.dtype == cupy.float32
    _compare(cpu, cupy.asnumpy(gpu))


@pytest.mark.parametrize("name", list(FILTERS))
def test_gpu_equals_cpu_with_nan_and_mask(name, rng, tmp_path):
    import cupy

    x = rng.normal(100, 30, (20, 18, 16)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = np.nan
    mask = np.zeros(x.shape, bool)
    mask[3:17, 2:15, 4:13] = True
    params = _params(name, tmp_path)
    cpu = apply_filter(x, VOX, name, mask=mask, **params)
    gpu = apply_filter(cupy.asarray(x), VOX, name, mask=cupy.asarray(mask), **params)
    _compare(cpu, cupy.asnumpy(gpu))


def test_gpu_image_level_on_real_mri(nib_data):
    assert resolve("gpu").name == "gpu"
    for name, params in [("gaussian", {"fwhm_mm": 6}), ("sobel", {}), ("sharpen", {})]:
        cpu = filter_image(nib_data("example4d.nii.gz"), name, backend="cpu", **params).get_fdata()
        gpu = filter_image(nib_data("example4d.nii.gz"), name, backend="gpu", **params).get_fdata()
        _compare(cpu, gpu)


def test_gpu_file_path_streams_and_equals_cpu(nib_data, tmp_path):
    import nibabel as nib

    from pipeline.image import FilterJob, filter_file

    outs = {}
    for be in ("cpu", "gpu"):
        jobs = [FilterJob("gaussian", {"fwhm_mm": 6}, str(tmp_path / f"{be}-g.nii.gz")),
                FilterJob("sobel", {}, str(tmp_path / f"{be}-e.nii.gz"))]  # fmt: skip
        assert filter_file(nib_data("example4d.nii.gz"), jobs, backend=be, sidecars=False) == be
        outs[be] = [nib.load(j.output).get_fdata() for j in jobs]
    for cpu, gpu in zip(outs["cpu"], outs["gpu"], strict=True):
        _compare(cpu, gpu)


def test_gpu_results_come_back_in_fortran_order(rng):
    # cupyx.scipy.ndimage returns C order even for Fortran input; the host gets NIfTI's order
    # without a host-side transpose.
    import cupy

    be = resolve("gpu")
    x = np.asfortranarray(rng.normal(100, 30, (19, 17, 13)).astype(np.float32))
    on_device = apply_filter(be.to_device(x), VOX, "gaussian", fwhm_mm=4.0)
    host = be.to_host(on_device)
    assert host.flags.f_contiguous
    np.testing.assert_array_equal(host, cupy.asnumpy(on_device))


def test_gpu_downloads_into_one_reused_page_locked_buffer(rng):
    import cupy

    be = resolve("gpu")
    x = np.asfortranarray(rng.normal(100, 30, (19, 17, 13)).astype(np.float32))
    staging = be.staging(x.shape)
    assert staging.flags.f_contiguous and staging.dtype == np.float32
    dev = be.to_device(x)
    for name, params in (("gaussian", {"fwhm_mm": 4.0}), ("sobel", {})):  # the second overwrites the first
        on_device = apply_filter(dev, VOX, name, **params)
        host = be.to_host(on_device, out=staging)
        assert np.shares_memory(host, staging) and host.flags.f_contiguous
        np.testing.assert_array_equal(host, cupy.asnumpy(on_device))
    other = be.to_host(cupy.ones((3, 4, 5), cupy.float32), out=staging)  # does not fit: a fresh array
    assert other.shape == (3, 4, 5) and not np.shares_memory(other, staging) and (other == 1).all()
    assert resolve("cpu").staging(x.shape) is None


def test_gpu_staging_falls_back_to_pageable_downloads(rng, monkeypatch, tmp_path):
    import cupy
    import cupyx
    import nibabel as nib

    from pipeline.image import FilterJob, filter_file

    def refuse(*args, **kwargs):
        raise cupy.cuda.runtime.CUDARuntimeError(2)  # cudaErrorMemoryAllocation

    monkeypatch.setattr(cupyx, "empty_pinned", refuse)
    assert resolve("gpu").staging((8, 8, 8)) is None
    src = tmp_path / "in.nii.gz"
    x = rng.normal(100, 30, (12, 11, 10)).astype(np.float32)
    nib.Nifti1Image(x, np.diag([1.0, 1.5, 2.5, 1])).to_filename(src)
    out = tmp_path / "out.nii.gz"
    filter_file(src, [FilterJob("gaussian", {"fwhm_mm": 4.0}, str(out))], backend="gpu", sidecars=False)
    _compare(apply_filter(x, VOX, "gaussian", fwhm_mm=4.0), nib.load(out).get_fdata())


def test_gpu_batch_of_files_in_one_call_equals_cpu(nib_data, tmp_path):
    import nibabel as nib

    from pipeline.image import FilterJob, filter_files

    sources = [nib_data("example4d.nii.gz"), nib_data("anatomical.nii")]
    outs = {}
    for be in ("cpu", "gpu"):
        volumes = [(src, [FilterJob("gaussian", {"fwhm_mm": 6}, str(tmp_path / f"{be}-{i}.nii.gz"))], None)
                   for i, src in enumerate(sources)]  # fmt: skip
        assert filter_files(volumes, backend=be, sidecars=False) == be
        outs[be] = [nib.load(jobs[0].output).get_fdata() for _, jobs, _ in volumes]
    for cpu, gpu in zip(outs["cpu"], outs["gpu"], strict=True):
        _compare(cpu, gpu)
