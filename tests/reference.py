"""Independent references for the filter tests: naive loops, written without scipy.ndimage."""

import itertools

import numpy as np

# scipy.ndimage border modes expressed as numpy.pad modes.
PAD_MODE = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap", "constant": "constant"}


def naive_correlate(x, kernel, mode="reflect"):
    """out[p] = sum_d kernel[c + d] * x[p + d], with explicit loops over offsets."""
    kernel = np.asarray(kernel, dtype=np.float64)
    r = [s // 2 for s in kernel.shape]
    pad = np.pad(np.asarray(x, np.float64), [(ri, ri) for ri in r], mode=PAD_MODE[mode])
    out = np.zeros(x.shape, np.float64)
    nx, ny, nz = x.shape
    for i, j, k in itertools.product(*(range(s) for s in kernel.shape)):
        w = kernel[i, j, k]
        if w != 0:
            out += w * pad[i : i + nx, j : j + ny, k : k + nz]
    return out


def naive_convolve(x, kernel, mode="reflect"):
    return naive_correlate(x, np.asarray(kernel)[::-1, ::-1, ::-1], mode)


def gaussian_kernel(sigma_vox, truncate=4.0):
    """Sampled, normalised 3-D Gaussian: the definition, built by hand."""
    axes = []
    for s in sigma_vox:
        r = int(truncate * s + 0.5)
        d = np.arange(-r, r + 1, dtype=np.float64)
        g = np.exp(-0.5 * (d / s) ** 2)
        axes.append(g / g.sum())
    return axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]


def sharpen_kernel(amount):
    k = np.zeros((3, 3, 3))
    k[1, 1, 1] = 1 + 6 * amount
    for a in range(3):
        for side in (0, 2):
            idx = [1, 1, 1]
            idx[a] = side
            k[tuple(idx)] = -amount
    return k


def emboss_kernel():
    k = np.zeros((3, 3, 3))
    for i, j, m in itertools.product(range(3), repeat=3):
        k[i, j, m] = (i - 1) + (j - 1) + (m - 1)
    k[1, 1, 1] = 1
    return k


def derivative_kernel(axis, smooth):
    k = np.zeros((3, 3, 3))
    for i, j, m in itertools.product(range(3), repeat=3):
        idx = (i, j, m)
        w = float(idx[axis] - 1)
        for a in range(3):
            if a != axis:
                w *= smooth[idx[a]]
        k[i, j, m] = w
    return k


def naive_fwhm(x, voxel_mm, mask=None):
    """Forman's smoothness estimator written out: float64 copy, boolean indexing, one axis at a time."""
    x = np.asarray(x, dtype=np.float64)
    valid = np.isfinite(x) if mask is None else (np.isfinite(x) & mask)
    if valid.sum() < 8:
        return (np.nan,) * 3
    var = x[valid].var()
    out = []
    for axis, h in enumerate(voxel_mm):
        a = [slice(None)] * 3
        b = [slice(None)] * 3
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        pair = valid[tuple(a)] & valid[tuple(b)]
        d = (x[tuple(a)] - x[tuple(b)])[pair]
        ratio = 1.0 - (d**2).mean() / (2.0 * var) if d.size >= 2 and var > 0 else np.nan
        out.append(h * np.sqrt(-2.0 * np.log(2.0) / np.log(ratio)) if 0 < ratio < 1 else np.nan)
    return tuple(out)
