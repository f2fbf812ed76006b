"""Filters against independent references: naive loops, scipy.ndimage, analytic answers."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from conftest import filter_params, oblique_affine
from numpy.testing import assert_allclose
from reference import (
    derivative_kernel,
    emboss_kernel,
    gaussian_kernel,
    naive_convolve,
    naive_correlate,
    sharpen_kernel,
)

from pipeline import VolfilterError, apply_filter
from pipeline.filters import FILTERS, MODES, check_params

VOX = (1.0, 1.5, 2.5)  # anisotropic grid for the naive-loop comparisons


@pytest.fixture
def small(rng):
    return rng.normal(100, 20, size=(9, 8, 7)).astype(np.float32)


# ---------------------------------------------------------------- naive loops


@pytest.mark.parametrize("mode", MODES)
def test_gaussian_equals_sampled_gaussian_kernel(small, mode):
    sigma_mm = 1.7
    out = apply_filter(small, VOX, "gaussian", sigma_mm=sigma_mm, mode=mode)
    ref = naive_correlate(small, gaussian_kernel([sigma_mm / h for h in VOX]), mode)
    assert out.dtype == np.float32
    assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def test_fwhm_and_sigma_agree(small):
    fwhm = 5.0
    a = apply_filter(small, VOX, "gaussian", fwhm_mm=fwhm)
    b = apply_filter(small, VOX, "gaussian", sigma_mm=fwhm / (2 * np.sqrt(2 * np.log(2))))
    assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_box_vox_equals_naive_mean(small, mode):
    out = apply_filter(small, VOX, "box", size_vox=3, mode=mode)
    assert_allclose(out, naive_correlate(small, np.full((3, 3, 3), 1 / 27), mode), rtol=1e-5, atol=1e-4)


def test_box_mm_uses_odd_voxel_counts_per_axis(small):
    # 3 mm box on (1, 1.5, 2.5) mm voxels: 3, 2 -> 3 (tie up), 1.2 -> 1 voxels.
    out = apply_filter(small, VOX, "box", size_mm=3.0)
    assert_allclose(out, naive_correlate(small, np.full((3, 3, 1), 1 / 9)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("amount", [1.0, 0.5])
@pytest.mark.parametrize("mode", ["reflect", "constant", "wrap"])
def test_sharpen_equals_naive_kernel(small, amount, mode):
    out = apply_filter(small, VOX, "sharpen", amount=amount, mode=mode)
    assert_allclose(out, naive_correlate(small, sharpen_kernel(amount), mode), rtol=1e-5, atol=1e-3)


def test_emboss_equals_naive_kernel(small):
    out = apply_filter(small, VOX, "emboss", mode="nearest")
    assert_allclose(out, naive_correlate(small, emboss_kernel(), "nearest"), rtol=1e-5, atol=1e-3)


def test_emboss_direction_bright_on_rising_diagonal():
    i, j, k = np.meshgrid(*(np.arange(7.0),) * 3, indexing="ij")
    rising = (i + j + k).astype(np.float32)
    out = apply_filter(rising, (1, 1, 1), "emboss")
    assert out[3, 3, 3] > rising[3, 3, 3]
    out = apply_filter(-rising, (1, 1, 1), "emboss")
    assert out[3, 3, 3] < -rising[3, 3, 3]


@pytest.mark.parametrize("name,smooth,gain", [("sobel", (1, 2, 1), 32.0), ("prewitt", (1, 1, 1), 18.0)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_gradient_axis_equals_naive_kernel_per_mm(small, name, smooth, gain, axis):
    out = apply_filter(small, VOX, name, axis=str(axis))
    ref = naive_correlate(small, derivative_kernel(axis, smooth)) / (gain * VOX[axis])
    assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name,smooth,gain", [("sobel", (1, 2, 1), 32.0), ("prewitt", (1, 1, 1), 18.0)])
def test_gradient_magnitude_equals_naive(small, name, smooth, gain):
    out = apply_filter(small, VOX, name)
    comps = [naive_correlate(small, derivative_kernel(a, smooth)) / (gain * VOX[a]) for a in range(3)]
    assert_allclose(out, np.sqrt(sum(c**2 for c in comps)), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["sobel", "prewitt"])
def test_gradient_of_ramp_is_physical_slope(name):
    # f = 2 x + 3 y - z in mm, on 1 x 1.5 x 2.5 mm voxels: gradient (2, 3, -1) per mm.
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in (8, 9, 10)), indexing="ij")
    f = (2 * i * VOX[0] + 3 * j * VOX[1] - k * VOX[2]).astype(np.float32)
    inner = (slice(1, -1),) * 3
    for axis, slope in enumerate((2.0, 3.0, -1.0)):
        assert_allclose(apply_filter(f, VOX, name, axis=str(axis))[inner], slope, rtol=1e-4)
    assert_allclose(apply_filter(f, VOX, name)[inner], np.sqrt(14.0), rtol=1e-4)


def test_unsharp_definition(small):
    blur = naive_correlate(small, gaussian_kernel([3.0 / 2.3548200450309493 / h for h in VOX]))
    out = apply_filter(small, VOX, "unsharp", fwhm_mm=3.0, amount=0.7)
    assert_allclose(out, small + 0.7 * (small - blur), rtol=1e-5, atol=1e-3)


def test_user_kernel_is_true_convolution(small, tmp_path):
    k = np.arange(27, dtype=float).reshape(3, 3, 3) - 13  # asymmetric: flips matter
    path = tmp_path / "k.npy"
    np.save(path, k)
    out = apply_filter(small, VOX, "kernel", kernel_file=str(path))
    assert_allclose(out, naive_convolve(small, k), rtol=1e-5, atol=1e-2)
    assert not np.allclose(out, naive_correlate(small, k), atol=1.0)


def test_identity_is_exact_float32_copy(small):
    out = apply_filter(small, VOX, "identity")
    assert out is not small and out.dtype == np.float32
    assert_allclose(out, small, rtol=0, atol=0)


# ---------------------------------------------------------------- scipy.ndimage on isotropic data


def test_isotropic_gaussian_equals_scipy(rng):
    x = rng.random((20, 18, 16)).astype(np.float32)
    out = apply_filter(x, (2.0, 2.0, 2.0), "gaussian", fwhm_mm=6.0)
    ref = ndi.gaussian_filter(x.astype(np.float64), sigma=6.0 / 2.3548200450309493 / 2.0)
    assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_isotropic_sobel_equals_scipy(rng):
    x = rng.random((12, 11, 10)).astype(np.float32)
    ref = np.sqrt(sum(ndi.sobel(x.astype(np.float64), axis=a) ** 2 for a in range(3))) / 32.0
    assert_allclose(apply_filter(x, (1, 1, 1), "sobel"), ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- analytic width in mm


def test_gaussian_width_in_mm_on_anisotropic_oblique_grid():
    voxel = (1.0, 2.0, 3.0)
    affine = oblique_affine(voxel)
    sigma = 4.0
    shape = (41, 25, 17)
    x = np.zeros(shape, np.float32)
    c = tuple(s // 2 for s in shape)
    x[c] = 1.0
    import nibabel as nib

    from pipeline.io import voxel_sizes_mm

    vox = voxel_sizes_mm(nib.Nifti1Image(x, affine))
    out = apply_filter(x, vox, "gaussian", sigma_mm=sigma).astype(np.float64)
    w = out / out.sum()
    idx = np.indices(shape).reshape(3, -1).T - np.array(c)
    # Second moment along each voxel axis, in mm^2.
    for a in range(3):
        m2 = np.sum(w.ravel() * (idx[:, a] * voxel[a]) ** 2)
        assert m2 == pytest.approx(sigma**2, rel=0.02)
    # In world space the blur is isotropic: covariance sigma^2 * I whatever the rotation.
    world = idx @ affine[:3, :3].T
    cov = (world * w.ravel()[:, None]).T @ world
    assert_allclose(cov, sigma**2 * np.eye(3), atol=0.02 * sigma**2)


# ---------------------------------------------------------------- NaN, masks, 4-D


def test_nan_does_not_smear_and_stays_nan(rng):
    x = np.full((12, 12, 12), 50.0, np.float32)
    x[6, 6, 6] = np.nan
    out = apply_filter(x, (1, 1, 1), "gaussian", fwhm_mm=4)
    assert (
        np.isnan(out[6, 6, 6]) and np.isfinite(np.delete(out.ravel(), np.ravel_multi_index((6, 6, 6), x.shape))).all()
    )
    # Normalised convolution keeps a constant field constant around the hole.
    assert_allclose(out[np.isfinite(out)], 50.0, rtol=1e-5)


def test_nan_equals_normalised_convolution_reference(rng):
    x = rng.normal(10, 2, (10, 9, 8)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    valid = np.isfinite(x)
    k = gaussian_kernel([1.5 / h for h in VOX])
    ref = naive_correlate(np.where(valid, x, 0), k) / naive_correlate(valid.astype(float), k)
    out = apply_filter(x, VOX, "gaussian", sigma_mm=1.5)
    assert_allclose(out[valid], ref[valid], rtol=1e-5)
    assert np.isnan(out[~valid]).all()


@pytest.mark.parametrize("name", ["sobel", "prewitt", "sharpen", "emboss", "box", "unsharp"])
def test_nan_stays_local_for_every_filter(name, rng):
    x = rng.normal(10, 2, (10, 10, 10)).astype(np.float32)
    x[5, 5, 5] = np.nan
    out = apply_filter(x, (1, 1, 1), name)
    assert np.isnan(out[5, 5, 5])
    assert np.isfinite(out).sum() == x.size - 1
    far = (slice(0, 2),) * 3  # far from the hole the result is unchanged
    clean = x.copy()
    clean[5, 5, 5] = 10
    assert_allclose(out[far], apply_filter(clean, (1, 1, 1), name)[far], rtol=1e-5)


def test_mask_blocks_leakage_and_zeroes_outside():
    x = np.full((16, 16, 16), 1000.0, np.float32)
    mask = np.zeros(x.shape, bool)
    mask[4:12, 4:12, 4:12] = True
    x[mask] = 10.0
    out = apply_filter(x, (1, 1, 1), "gaussian", fwhm_mm=5, mask=mask)
    assert_allclose(out[mask], 10.0, rtol=1e-5)
    assert (out[~mask] == 0).all()
    unmasked = apply_filter(x, (1, 1, 1), "gaussian", fwhm_mm=5)
    assert unmasked[4, 4, 4] > 100  # without the mask the bright outside leaks in


def test_mask_with_signed_kernel_sees_no_cliff():
    x = np.full((12, 12, 12), 7.0, np.float32)
    mask = np.zeros(x.shape, bool)
    mask[3:9, 3:9, 3:9] = True
    out = apply_filter(x, (1, 1, 1), "sobel", mask=mask)
    assert_allclose(out[mask], 0.0, atol=1e-6)  # flat inside: no edge at the mask border


def test_4d_is_filtered_volume_by_volume(rng):
    x = rng.random((8, 7, 6, 3)).astype(np.float32)
    out = apply_filter(x, VOX, "gaussian", fwhm_mm=3)
    assert out.shape == x.shape and out.dtype == np.float32
    for t in range(3):
        assert_allclose(out[..., t], apply_filter(x[..., t], VOX, "gaussian", fwhm_mm=3), rtol=1e-6)


def test_integer_input_is_filtered_in_float32():
    x = np.arange(5 * 5 * 5, dtype=np.int16).reshape(5, 5, 5)
    out = apply_filter(x, (1, 1, 1), "identity")
    assert out.dtype == np.float32 and np.array_equal(out, x.astype(np.float32))


# ---------------------------------------------------------------- parameter checking


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("nope", {}, "unknown filter"),
        ("gaussian", {}, "exactly one"),
        ("gaussian", {"fwhm_mm": 2, "sigma_mm": 1}, "exactly one"),
        ("gaussian", {"fwhm_mm": -2}, "positive"),
        ("gaussian", {"fwhm_mm": float("nan")}, "finite"),
        ("box", {"size_vox": 4}, "odd"),
        ("sobel", {"axis": "3"}, "axis"),
        ("sobel", {"fwhm_mm": 3}, "no parameter"),
        ("kernel", {}, "kernel_file"),
    ],
)
def test_bad_parameters_are_user_errors(name, params, fragment):
    with pytest.raises(VolfilterError, match=fragment):
        check_params(name, params)


def test_every_filter_runs_on_every_mode(small, tmp_path):
    np.save(tmp_path / "k.npy", np.ones((3, 1, 1)))
    extra = {"gaussian": {"fwhm_mm": 2}, "kernel": {"kernel_file": str(tmp_path / "k.npy")}}
    for name in FILTERS:
        for mode in MODES:
            out = apply_filter(small, VOX, name, mode=mode, **extra.get(name, {}))
            assert out.shape == small.shape and out.dtype == np.float32 and np.isfinite(out).all()


# ---------------------------------------------------------------- memory order on the scipy.ndimage path


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("missing", [False, True])
def test_plain_path_fortran_volume_equals_c_volume(name, mode, missing, rng, tmp_path, monkeypatch):
    # Without the compiled kernels a Fortran-ordered volume is filtered as its C-ordered view with
    # the axes (voxel sizes, derivative axis, kernel) reversed; the result must be the same and
    # Fortran-ordered, so that the NIfTI writer need not transpose it.
    import pipeline.filters as filters

    monkeypatch.setattr(filters, "fast_cpu", lambda a: None)
    c = rng.normal(100, 20, (11, 9, 7)).astype(np.float32)
    mask = None
    if missing:
        c[rng.random(c.shape) < 0.08] = np.nan
        mask = np.zeros(c.shape, bool)
        mask[1:10, 2:8, 1:6] = True
    f = np.asfortranarray(c)
    params = filter_params(name, tmp_path)
    axes = ["0", "1", "2", "magnitude"] if name in ("sobel", "prewitt") else [None]
    for axis in axes:
        extra = {} if axis is None else {"axis": axis}
        from_c = apply_filter(c, VOX, name, mode=mode, mask=mask, **params, **extra)
        from_f = apply_filter(f, VOX, name, mode=mode, mask=mask, **params, **extra)
        assert from_f.flags.f_contiguous and not from_f.flags.c_contiguous
        scale = float(np.nanmax(np.abs(from_c))) or 1.0
        assert_allclose(from_f, from_c, rtol=1e-5, atol=1e-6 * scale, equal_nan=True)


def test_plain_path_fortran_volume_against_naive_loops(rng, monkeypatch):
    # The same, against independent references: a per-axis derivative on an anisotropic grid and
    # a Gaussian whose sigma differs per axis, on a Fortran-ordered volume.
    import pipeline.filters as filters

    monkeypatch.setattr(filters, "fast_cpu", lambda a: None)
    x = np.asfortranarray(rng.normal(100, 20, (9, 8, 7)).astype(np.float32))
    for axis in (0, 1, 2):
        ref = naive_correlate(x, derivative_kernel(axis, (1, 2, 1)), "reflect") / (32.0 * VOX[axis])
        assert_allclose(apply_filter(x, VOX, "sobel", axis=str(axis)), ref, rtol=1e-5, atol=1e-4)
    ref = naive_correlate(x, gaussian_kernel([1.7 / h for h in VOX]), "reflect")
    assert_allclose(apply_filter(x, VOX, "gaussian", sigma_mm=1.7), ref, rtol=1e-5, atol=1e-4)
