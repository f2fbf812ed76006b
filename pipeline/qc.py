"""Quality control: smoothness estimates, intensity metrics and figures.

Plotting imports matplotlib (Agg) lazily, inside the functions that draw, so
filter jobs never pay for it.

Examples
--------
>>> import numpy as np
>>> from pipeline.filters import apply_filter
>>> noise = np.random.default_rng(0).normal(size=(48, 48, 48)).astype(np.float32)
>>> smooth = apply_filter(noise, (2.0, 2.0, 2.0), "gaussian", fwhm_mm=8.0)
>>> [round(f) for f in smoothness_fwhm(smooth, (2.0, 2.0, 2.0))]
[8, 8, 8]
"""

from __future__ import annotations

import csv
import gc
import io as _io
import math
import os

import numpy as np

from .backend import fast_cpu, fast_cpu_flat
from .errors import VolfilterError

EDGE_KINDS = {"sobel", "prewitt"}
METRIC_COLUMNS = ["min", "max", "mean", "std", "nan_count", "fwhm_x_mm", "fwhm_y_mm", "fwhm_z_mm"]


def smoothness_fwhm(data, voxel_mm, mask=None) -> tuple[float, float, float]:
    """FWHM in mm per axis from the variance of first differences (Forman et al. 1995).

    The classic estimator of AFNI's 3dFWHMx (``-classic``) and FSL's smoothest:
    for a Gaussian random field smoothed by a Gaussian kernel of FWHM ``F``,
    ``Var(dx) / (2 Var(x)) = 1 - exp(-dx^2 4 ln2 / (2 F^2))`` along each axis,
    so ``F = dx * sqrt(-2 ln2 / ln(1 - Var(dx) / (2 Var(x))))``.

    Only voxel pairs that are both finite (and inside ``mask``) count; a 4-D
    series is estimated per volume and averaged. An axis whose differences are
    anti-correlated (edge maps, sharpened noise) has no defined FWHM: NaN.
    """
    data = np.asarray(data)
    vols = [data] if data.ndim == 3 else [data[..., t] for t in range(data.shape[3])]
    per_vol = [_fwhm_3d(v, voxel_mm, mask) for v in vols]
    return tuple(float(np.nanmean(col)) if np.isfinite(col).any() else math.nan for col in zip(*per_vol, strict=True))


SLAB_VOXELS = 1 << 20  # the estimators run over slabs of ~1 M voxels: float64 temporaries of ~8 MB


def _slabs(n_voxels_per_plane: int, n_planes: int):
    """``(k0, k1)`` ranges along the last axis, each ~SLAB_VOXELS voxels."""
    step = max(1, SLAB_VOXELS // max(1, n_voxels_per_plane))
    return [(k, min(k + step, n_planes)) for k in range(0, n_planes, step)]


def _fwhm_3d(x, voxel_mm, mask):
    """Forman's estimator over the valid voxels of one volume.

    The sums (``tests/reference.py`` writes them out with float64 copies and boolean indexing)
    come from two C passes (:func:`pipeline.native.fwhm_sums`) for float32 volumes when the kernels
    are built, else from NumPy slab by slab. 256³ on 2 cores: textbook 2.3 s, slabs 0.2 s, C 0.03 s
    (0.05 s on one thread, as in a QC job).
    """
    x = np.asarray(x)
    fast = fast_cpu(x)
    if fast is not None:
        n, ss, d2, pairs = fast.fwhm_sums(x, mask)
    else:
        n, ss, d2, pairs = _fwhm_sums_numpy(x, mask)
    if n < 8:
        return (math.nan,) * 3
    var = ss / n
    out = []
    for axis, h in enumerate(voxel_mm):
        if pairs[axis] < 2 or var <= 0:
            out.append(math.nan)
            continue
        ratio = 1.0 - d2[axis] / pairs[axis] / (2.0 * var)
        out.append(h * math.sqrt(-2.0 * math.log(2.0) / math.log(ratio)) if 0 < ratio < 1 else math.nan)
    return tuple(out)


def _fwhm_sums_numpy(x, mask):
    """:func:`pipeline.native.fwhm_sums` in NumPy, in float64 over slabs of ~1 M voxels."""
    valid = np.isfinite(x) if mask is None else (np.isfinite(x) & mask)
    n = int(np.count_nonzero(valid))
    if n == 0:
        return 0, 0.0, [0.0] * 3, [0] * 3
    slabs = _slabs(x.shape[0] * x.shape[1], x.shape[2])
    total = sum(float(np.sum(x[:, :, a:b], where=valid[:, :, a:b], dtype=np.float64)) for a, b in slabs)
    mean = total / n
    ss = 0.0  # sum of squared deviations (two passes: no cancellation for MRI's large means)
    d2 = [0.0, 0.0, 0.0]  # sum of squared first differences along each axis, over valid pairs
    pairs = [0, 0, 0]
    with np.errstate(invalid="ignore"):
        for a, b in slabs:
            b1 = min(b + 1, x.shape[2])  # one plane more: the pairs along the last axis across slabs
            xs = x[:, :, a:b1].astype(np.float64)
            vs = valid[:, :, a:b1]
            dev = np.where(vs[:, :, : b - a], xs[:, :, : b - a] - mean, 0.0).ravel(order="K")
            ss += float(np.dot(dev, dev))
            for axis in range(3):
                lo = [slice(None), slice(None), slice(0, b - a)]
                hi = [slice(None), slice(None), slice(0, b - a)]
                if axis == 2:
                    lo[2], hi[2] = slice(0, b1 - a - 1), slice(1, b1 - a)
                else:
                    lo[axis], hi[axis] = slice(0, -1), slice(1, None)
                pair = vs[tuple(hi)] & vs[tuple(lo)]
                d = np.where(pair, xs[tuple(hi)] - xs[tuple(lo)], 0.0).ravel(order="K")
                d2[axis] += float(np.dot(d, d))
                pairs[axis] += int(np.count_nonzero(pair))
    return n, ss, d2, pairs


def foreground_mask(data) -> np.ndarray:
    """Voxels above 10 % of the 98th percentile of the first volume: the head, not the air.

    Smoothness of MRI is estimated inside the head, where the signal is (as
    3dFWHMx's automask does); the same mask is used for input and output.
    """
    first = np.asarray(data if data.ndim == 3 else data[..., 0])
    finite = np.isfinite(first)
    if not finite.any():
        return finite
    values = first if finite.all() else first[finite]
    # The 98th percentile of the values as stored (float32: no float64 copy of the volume).
    thr = 0.1 * float(np.percentile(values.ravel(order="K"), 98))
    return finite & (first > thr)


def _finite_stats(data) -> tuple[float, float, float, float, int]:
    """min, max, mean, std (population) of the finite voxels, and the number of NaN voxels.

    One C pass for the counts, extremes and sum and one for the squared deviations
    (:func:`pipeline.native.finite_stats`) for contiguous float32 data when the kernels are built,
    else NumPy slab by slab; sums in float64 either way. 256^3: NumPy 80-100 ms, C 22 ms on one thread.
    """
    fast = fast_cpu_flat(data)
    if fast is not None:
        n, nans, lo, hi, mean, ss = fast.finite_stats(data)
        return (lo, hi, mean, math.sqrt(ss / n), nans) if n else (math.nan,) * 4 + (nans,)
    flat = data.ravel(order="K")  # a view when the array is contiguous in either order
    n, nans, lo, hi, total = 0, 0, math.inf, -math.inf, 0.0
    chunks = range(0, flat.size, SLAB_VOXELS)
    for c in chunks:
        part = flat[c : c + SLAB_VOXELS]
        fin = np.isfinite(part)
        k = int(np.count_nonzero(fin))
        if k < part.size:
            nans += int(np.count_nonzero(np.isnan(part)))
        if k == 0:
            continue
        vals = part if k == part.size else part[fin]
        n, lo, hi = n + k, min(lo, float(vals.min())), max(hi, float(vals.max()))
        total += float(np.sum(vals, dtype=np.float64))
    if n == 0:
        return (math.nan,) * 4 + (nans,)
    mean = total / n
    ss = 0.0
    for c in chunks:
        part = flat[c : c + SLAB_VOXELS]
        fin = np.isfinite(part)
        dev = (part if fin.all() else part[fin]).astype(np.float64) - mean
        ss += float(np.dot(dev, dev))
    return lo, hi, mean, math.sqrt(ss / n), nans


def metrics(data, voxel_mm, mask=None) -> dict:
    """min/max/mean/std over finite voxels, NaN count, and smoothness FWHM per axis in mm."""
    data = np.asarray(data)
    fx, fy, fz = smoothness_fwhm(data, voxel_mm, mask)
    stats = _finite_stats(data)
    return {
        "min": stats[0],
        "max": stats[1],
        "mean": stats[2],
        "std": stats[3],
        "nan_count": stats[4],
        "fwhm_x_mm": fx,
        "fwhm_y_mm": fy,
        "fwhm_z_mm": fz,
    }


def describe(spec: dict) -> str:
    """``gaussian fwhm_mm=6`` from ``{"kind": "gaussian", "fwhm_mm": 6}``."""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(spec.items()) if k != "kind")
    return f"{spec['kind']} {params}".strip()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str) and os.sep in v:
        return os.path.basename(v)
    return str(v)


def metrics_rows(volume_label: str, in_metrics: dict, outputs: dict) -> list[dict]:
    """One row per filter: the volume, the filter, and in_/out_ metric columns."""
    rows = []
    for name, (spec, out_metrics) in outputs.items():
        params = describe(spec)[len(spec["kind"]) :].strip()
        row = {"volume": volume_label, "filter": name, "kind": spec["kind"], "params": params}
        row.update({f"in_{k}": in_metrics[k] for k in METRIC_COLUMNS})
        row.update({f"out_{k}": out_metrics[k] for k in METRIC_COLUMNS})
        rows.append(row)
    return rows


def rows_to_tsv(rows: list[dict]) -> str:
    if not rows:
        raise VolfilterError("no QC rows to write")
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def read_tsv(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# ---------------------------------------------------------------- figures


def to_ras(data, affine, voxel_mm):
    """Reorder/flip array axes so that they run R, A, S; return data and permuted voxel sizes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.apply_orientation(data, ornt)
    order = [int(i) for i in ornt[:, 0]]
    vox = [0.0, 0.0, 0.0]
    for src, dst in enumerate(order):
        vox[dst] = voxel_mm[src]
    return ras, tuple(vox)


def _views(vol, vox):
    """Axial, coronal and sagittal slices through the centre, each (image, aspect)."""
    cx, cy, cz = (s // 2 for s in vol.shape[:3])
    # imshow with origin="lower": rows run along the second axis listed.
    # Copies, not views: a figure holding a view would keep the whole volume alive.
    return [
        ("axial", np.array(vol[:, :, cz].T), vox[1] / vox[0], ("R", "A")),
        ("coronal", np.array(vol[:, cy, :].T), vox[2] / vox[0], ("R", "S")),
        ("sagittal", np.array(vol[cx, :, :].T), vox[2] / vox[1], ("A", "S")),
    ]


PERCENTILE_SAMPLES = 1 << 20


def _limits(data, kind):
    """Display range from percentiles of the finite voxels (of every k-th voxel, k fixed by size, past 2^20)."""
    flat = data.ravel(order="K")  # a view when the array is contiguous in either order
    sample = flat[:: max(1, flat.size // PERCENTILE_SAMPLES)]
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return 0.0, 1.0
    if kind in EDGE_KINDS:
        return 0.0, float(np.percentile(finite, 99.5)) or 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


SHARED_RANGE_MAX_WIDTH = 1.5  # see display_ranges


def display_ranges(in_data, out_data, kind) -> tuple[tuple[float, float], tuple[float, float], bool]:
    """The input's and the output's display ranges, and whether they are one shared range.

    The output is drawn on the input's range, so that a change of contrast shows, while that range
    can hold it: the output's own range (1st to 99.5th percentile) at most SHARED_RANGE_MAX_WIDTH
    times as wide as the input's. A Gaussian, a box or an unsharp mask stays on the input's range.
    A Laplacian sharpen of a noisy image, an emboss, or a custom kernel that scales the data spreads
    the output far past it (the example T1: a 1.0 sharpen, 3.9x; an emboss, 14x): on a shared range
    most voxels would be drawn black or white, so the output gets its own. Edge maps always get their
    own (from 0), with their own colour map.
    """
    in_lim = _limits(in_data, "input")
    out_lim = _limits(out_data, kind)
    if kind in EDGE_KINDS:
        return in_lim, out_lim, False
    if out_lim[1] - out_lim[0] <= SHARED_RANGE_MAX_WIDTH * (in_lim[1] - in_lim[0]):
        return in_lim, in_lim, True
    return in_lim, out_lim, False


def _histogram(data, edges) -> np.ndarray:
    """``np.histogram(data, bins=edges)[0]``; one pass in C for contiguous float32 data (256³: 0.12 -> 0.04 s)."""
    fast = fast_cpu_flat(data)
    if fast is not None:
        return fast.histogram(data, edges)
    return np.histogram(data.ravel(order="K"), bins=edges)[0]


def _count_label(count, _pos=None) -> str:
    """A histogram count as a short label: 1, 10, 100, 1k, 10k, 2.5M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:g}{suffix}"
    return f"{count:g}"


def qc_figure(in_data, out_data, affine, voxel_mm, title: str, spec: dict, path, ranges=None) -> None:
    """Orthogonal RAS slices of input (top) and output (bottom), colour bars, and histograms.

    The output row shares the input's display range unless that range cannot
    hold it (:func:`display_ranges`); its title then says "own range". Edge maps
    get their own scale and colour map.
    ``ranges``: the (min, max) of the finite voxels of input and output when
    already known (from :func:`metrics`), else computed here.
    """
    from matplotlib.figure import Figure

    in3 = in_data if in_data.ndim == 3 else in_data[..., 0]
    out3 = out_data if out_data.ndim == 3 else out_data[..., 0]
    in_ras, vox = to_ras(in3, affine, voxel_mm)
    out_ras, _ = to_ras(out3, affine, voxel_mm)
    kind = spec["kind"]
    in_lim, out_lim, shared = display_ranges(in_ras, out_ras, kind)
    out_cmap = "magma" if kind in EDGE_KINDS else "gray"
    out_label = title if shared or kind in EDGE_KINDS else f"{title} (own range)"

    fig = Figure(figsize=(14, 6.4), dpi=100)
    # Columns: three views, colour bar, spacer (room for the bar's tick labels), histogram.
    grid = fig.add_gridspec(2, 6, width_ratios=[1, 1, 1, 0.05, 0.3, 1.3], wspace=0.25, hspace=0.3)
    for row, (vol, lim, cmap, label) in enumerate(
        [(in_ras, in_lim, "gray", "input"), (out_ras, out_lim, out_cmap, out_label)]
    ):
        im = None
        for col, (view, img, aspect, (hlab, vlab)) in enumerate(_views(vol, vox)):
            ax = fig.add_subplot(grid[row, col])
            im = ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1], origin="lower", aspect=aspect,
                           interpolation="nearest")  # fmt: skip
            # y given: no search for tick labels above the axes (there are none): 5% of a figure.
            ax.set_title(f"{label} — {view}", fontsize=9, y=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(f"→ {hlab}", fontsize=8)
            ax.set_ylabel(f"→ {vlab}", fontsize=8)
        cax = fig.add_subplot(grid[row, 3])
        fig.colorbar(im, cax=cax)
    hax = fig.add_subplot(grid[:, 5])
    (in_lo, in_hi), (out_lo, out_hi) = ranges or [_finite_stats(d)[:2] for d in (in_data, out_data)]
    lo = min(0.0, *(v for v in (in_lo, out_lo) if math.isfinite(v)))
    hi = max(1.0, *(v for v in (in_hi, out_hi) if math.isfinite(v)))
    edges = np.linspace(lo, hi if hi > lo else lo + 1, 80)
    # Counted over the whole volume (non-finite voxels fall outside the edges) and drawn from the
    # 79 counts: the same step outline as hist() on the values, without copying them.
    for data, color, label in ((in_data, "0.3", "input"), (out_data, "tab:orange", title)):
        counts = _histogram(data, edges)
        hax.hist(edges[:-1], bins=edges, weights=counts, histtype="step", color=color, label=label, log=True)
    # Counts labelled 1, 10, ..., 1k, 1M as plain text, and no minor ticks: the default 10^k labels
    # go through mathtext, and the minor ticks of seven decades are ~70 tick objects to lay out;
    # the two took ~40% of drawing a figure (0.2 of 0.5 s, 256^3 on the 2-core VM).
    from matplotlib.ticker import FuncFormatter, NullLocator

    hax.yaxis.set_major_formatter(FuncFormatter(_count_label))
    hax.yaxis.set_minor_locator(NullLocator())
    hax.set_title("intensity histogram (log count)", fontsize=9, y=1.0)
    hax.set_xlabel("intensity")
    hax.legend(fontsize=8)
    series = "" if in_data.ndim == 3 else f" (slices of volume 1 of {in_data.shape[3]}, histogram of all)"
    fig.suptitle(f"{title}: {describe(spec)}{series}", fontsize=11)
    _save_png(fig, path)


def group_figure(rows: list[dict], path) -> None:
    """Smoothness (mean FWHM over axes) before vs after, one marker per volume, per filter."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    def mean_fwhm(row, side):
        vals = [float(row[f"{side}_fwhm_{a}_mm"]) for a in "xyz"]
        vals = [v for v in vals if math.isfinite(v)]
        return sum(vals) / len(vals) if vals else math.nan

    fig = Figure(figsize=(7, 6), dpi=100)
    ax = fig.add_subplot()
    names = sorted({r["filter"] for r in rows})
    cmap = colormaps["tab10"]
    top = 0.0
    for i, name in enumerate(names):
        sel = [r for r in rows if r["filter"] == name]
        xs = [mean_fwhm(r, "in") for r in sel]
        ys = [mean_fwhm(r, "out") for r in sel]
        undefined = sum(1 for y in ys if not math.isfinite(y))
        label = f"{name} ({sel[0]['kind']} {sel[0]['params']})".replace(" )", ")")
        label += f", {undefined} undefined" if undefined else ""
        ax.scatter(xs, ys, color=cmap(i % 10), label=label, s=40, alpha=0.8)
        top = max([top] + [v for v in xs + ys if math.isfinite(v)])
    top = top * 1.1 or 1.0
    ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--", label="unchanged")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("input smoothness, mean FWHM over axes (mm)")
    ax.set_ylabel("output smoothness, mean FWHM over axes (mm)")
    ax.set_title(f"Smoothness before and after filtering ({len({r['volume'] for r in rows})} volumes)")
    ax.legend(fontsize=8, loc="lower right")
    _save_png(fig, path)


def _save_png(fig, path):
    from .io import atomic_write

    # No Software/date metadata: the same inputs give the same bytes.
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", metadata={"Software": None}))


# ---------------------------------------------------------------- per volume and per study


def volume_qc(input_path, derived: dict, pngs: dict, metrics_path, label: str) -> list[dict]:
    """QC of one input volume and its derivatives; never modifies the derived volumes.

    Parameters
    ----------
    derived : {name: (spec, path)}
        Each filter's spec (``{"kind": ..., params}``) and derived volume.
    pngs : {name: path}
        Where each filter's figure goes.
    metrics_path : path
        TSV with one row per filter (in_/out_ metrics).
    """
    from . import io
    from .provenance import write_text

    vol = io.load(input_path)
    mask = foreground_mask(vol.data)
    in_m = metrics(vol.data, vol.voxel_mm, mask)
    results = {}
    for name, (spec, path) in derived.items():
        out = io.load(path)
        if out.data.shape != vol.data.shape:
            raise VolfilterError(f"{path}: shape {out.data.shape} differs from its input's {vol.data.shape}")
        out_m = metrics(out.data, vol.voxel_mm, mask)
        results[name] = (spec, out_m)
        if name in pngs:
            ranges = [(m["min"], m["max"]) for m in (in_m, out_m)]
            qc_figure(vol.data, out.data, vol.affine, vol.voxel_mm, name, spec, pngs[name], ranges)
        # Before the next one is read: the input and one output in memory, not two or four. The
        # first figure's lazy imports leave tracebacks whose frames still see this output, in
        # reference cycles only the cyclic collector frees: without it, a 131 MB series' QC job
        # peaked at 630 MB instead of 369 MB (256^3: 388 MB instead of 320 MB).
        del out
        gc.collect()
    rows = metrics_rows(label, in_m, results)
    write_text(metrics_path, rows_to_tsv(rows))
    return rows


def group_qc(metrics_paths, table_path, figure_path) -> list[dict]:
    """Concatenate per-volume metrics into one study table and draw the smoothness summary."""
    from .provenance import write_text

    rows = [row for p in metrics_paths for row in read_tsv(p)]
    write_text(table_path, rows_to_tsv(rows))
    group_figure(rows, figure_path)
    return rows
