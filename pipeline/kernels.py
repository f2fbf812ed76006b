"""Explicit 3-D kernels of the classic image-convolution toolbox.

The filters in :mod:`pipeline.filters` use faster separable or specialised
scipy/cupyx routines where they exist; the explicit kernels here define what
those routines must equal and serve the naive-loop tests and the docs.

Kernels are given in *correlation* form (the weight at offset ``d`` multiplies
the voxel at ``x + d``), the convention of ``scipy.ndimage.correlate``. For the
symmetric kernels correlation and convolution are the same; for ``emboss``
and Sobel/Prewitt the sign convention is the one stated in each docstring.
"""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import VolfilterError

FWHM_PER_SIGMA = math.sqrt(8.0 * math.log(2.0))


def identity() -> np.ndarray:
    """The 3×3×3 delta kernel."""
    k = np.zeros((3, 3, 3), np.float64)
    k[1, 1, 1] = 1.0
    return k


def box(size_vox=(3, 3, 3)) -> np.ndarray:
    """Mean over an odd ``size_vox`` block of voxels."""
    n = tuple(int(s) for s in size_vox)
    return np.full(n, 1.0 / np.prod(n))


def laplacian6() -> np.ndarray:
    """The 6-neighbour discrete Laplacian (sum of neighbours minus 6× centre)."""
    k = np.zeros((3, 3, 3))
    for axis in range(3):
        for side in (0, 2):
            idx = [1, 1, 1]
            idx[axis] = side
            k[tuple(idx)] = 1.0
    k[1, 1, 1] = -6.0
    return k


def sharpen(amount: float = 1.0) -> np.ndarray:
    """Identity minus ``amount`` × the 6-neighbour Laplacian.

    With ``amount=1`` the centre is 7 and the six face neighbours -1: the 3-D
    form of the classic 2-D ``[[0,-1,0],[-1,5,-1],[0,-1,0]]``.

    >>> float(sharpen()[1, 1, 1]), float(sharpen()[0, 1, 1]), float(sharpen().sum())
    (7.0, -1.0, 1.0)
    """
    return identity() - amount * laplacian6()


def emboss() -> np.ndarray:
    """The 3-D emboss kernel, lit along the +i+j+k voxel diagonal.

    The weight at offset ``(di, dj, dk)`` is ``di + dj + dk`` and the centre is
    1, the 3-D form of the classic 2-D ``[[-2,-1,0],[-1,1,1],[0,1,2]]``. In
    correlation form, voxels whose intensity rises towards higher i, j and k
    come out bright and those where it falls come out dark; flat regions keep
    their value (the weights sum to 1).

    >>> k = emboss(); float(k[0, 0, 0]), float(k[2, 2, 2]), float(k[1, 1, 1]), float(k.sum())
    (-3.0, 3.0, 1.0, 1.0)
    """
    d = np.arange(-1, 2, dtype=np.float64)
    k = d[:, None, None] + d[None, :, None] + d[None, None, :]
    k[1, 1, 1] = 1.0
    return k


def _derivative(axis: int, smooth: np.ndarray) -> np.ndarray:
    diff = np.array([-1.0, 0.0, 1.0])
    parts = [smooth, smooth, smooth]
    parts[axis] = diff
    return parts[0][:, None, None] * parts[1][None, :, None] * parts[2][None, None, :]


def sobel(axis: int) -> np.ndarray:
    """Raw 3-D Sobel kernel for ``axis`` (central difference × [1,2,1] smoothing).

    On a ramp rising by 1 per voxel it responds 32; the filters divide by
    ``32 × voxel size`` so the result is a gradient in intensity per mm.
    """
    return _derivative(axis, np.array([1.0, 2.0, 1.0]))


def prewitt(axis: int) -> np.ndarray:
    """Raw 3-D Prewitt kernel for ``axis`` (central difference × [1,1,1]); ramp response 18."""
    return _derivative(axis, np.array([1.0, 1.0, 1.0]))


SOBEL_RAMP_GAIN = 32.0
PREWITT_RAMP_GAIN = 18.0


def load_kernel_file(path: str | os.PathLike) -> np.ndarray:
    """Read a user kernel from ``.npy`` or whitespace-separated text.

    Text layout: one 2-D block of rows per index along axis 0, blocks separated
    by a blank line (a single block gives a kernel one voxel thick along axis 0).
    Every size must be odd so the kernel has a centre. Lines starting with
    ``#`` are comments.

    Raises
    ------
    VolfilterError
        Missing or unreadable file, non-numeric entries, ragged rows, wrong
        number of dimensions, even sizes, or non-finite weights.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise VolfilterError(f"kernel file {path!r} does not exist")
    try:
        if path.endswith(".npy"):
            kernel = np.load(path, allow_pickle=False)
        else:
            kernel = _parse_kernel_text(path)
        kernel = np.asarray(kernel, dtype=np.float64)
    except VolfilterError:
        raise
    except (ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
        raise VolfilterError(f"kernel file {path!r} is not a numeric kernel: {exc}") from None
    if kernel.ndim != 3:
        raise VolfilterError(
            f"kernel file {path!r} holds a {kernel.ndim}-D array; a 3-D kernel is needed "
            "(use shape (n, 1, 1) or a single text block for a lower-dimensional kernel)"
        )
    if any(s % 2 == 0 for s in kernel.shape):
        raise VolfilterError(
            f"kernel file {path!r} has shape {kernel.shape}; every size must be odd so the kernel has a centre"
        )
    if not np.all(np.isfinite(kernel)):
        raise VolfilterError(f"kernel file {path!r} contains NaN or infinite weights")
    return kernel


def _parse_kernel_text(path: str) -> np.ndarray:
    with open(path, encoding="utf-8") as fh:
        lines = [ln.split("#", 1)[0].rstrip() for ln in fh]
    blocks, current = [], []
    for ln in lines + [""]:
        if ln.strip():
            current.append([float(tok) for tok in ln.split()])
        elif current:
            blocks.append(current)
            current = []
    if not blocks:
        raise VolfilterError(f"kernel file {path!r} holds no numbers")
    widths = {len(row) for block in blocks for row in block}
    heights = {len(block) for block in blocks}
    if len(widths) != 1 or len(heights) != 1:
        raise VolfilterError(f"kernel file {path!r} has ragged rows or blocks of different heights")
    return np.array(blocks)
