"""QC: the smoothness estimator against known FWHM, metrics, figures, determinism."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
from reference import naive_fwhm

from pipeline import qc
from pipeline.filters import apply_filter


@pytest.mark.parametrize("fwhm,voxel", [(6.0, (2.0, 2.0, 2.0)), (8.0, (1.5, 2.0, 3.0)), (4.0, (1.0, 1.0, 1.0))])
def test_smoothness_recovers_known_fwhm(fwhm, voxel):
    noise = np.random.default_rng(7).normal(size=(64, 60, 56)).astype(np.float32)
    smooth = apply_filter(noise, voxel, "gaussian", fwhm_mm=fwhm, mode="wrap")
    est = qc.smoothness_fwhm(smooth, voxel)
    for axis in range(3):
        assert est[axis] == pytest.approx(fwhm, rel=0.10), (axis, est)


def test_smoothness_is_nan_for_anticorrelated_data():
    x = np.indices((8, 8, 8)).sum(axis=0) % 2 * 2.0 - 1  # checkerboard: neighbours anti-correlated
    assert all(np.isnan(qc.smoothness_fwhm(x, (1, 1, 1))))


def test_smoothness_ignores_nan_and_masked_voxels():
    noise = np.random.default_rng(3).normal(size=(48, 48, 48)).astype(np.float32)
    smooth = apply_filter(noise, (2, 2, 2), "gaussian", fwhm_mm=6.0, mode="wrap")
    holed = smooth.copy()
    holed[10:20, 10:20, 10:20] = np.nan
    mask = np.ones(smooth.shape, bool)
    mask[:, :, :8] = False
    base = qc.smoothness_fwhm(smooth, (2, 2, 2))
    assert qc.smoothness_fwhm(holed, (2, 2, 2), mask) == pytest.approx(base, rel=0.05)


@pytest.mark.parametrize("path", ["C kernel", "NumPy slabs"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_estimators_match_the_textbook_form(order, path, monkeypatch):
    """Smoothness (C pass or NumPy slabs) and intensity statistics equal the whole-volume formulas."""
    monkeypatch.setattr(qc, "SLAB_VOXELS", 1000)  # 20 x 18 planes: slabs of 2 planes, pairs across slabs
    if path == "NumPy slabs":
        monkeypatch.setattr(qc, "fast_cpu", lambda x: None)
        monkeypatch.setattr(qc, "fast_cpu_flat", lambda x: None)
    elif qc.fast_cpu(np.zeros((2, 2, 2), np.float32)) is None:
        pytest.skip("the C kernels are not built")
    rng = np.random.default_rng(11)
    x = apply_filter(rng.normal(size=(20, 18, 15)).astype(np.float32), (1.5, 2, 3), "gaussian", fwhm_mm=5) * 40 + 900
    x = np.asarray(x, order=order)
    x[3:7, 2:9, 4:9] = np.nan
    x[0, 0, 14] = np.inf
    mask = np.ones(x.shape, bool)
    mask[:, :5, :] = False
    for m in (None, mask):
        assert qc.smoothness_fwhm(x, (1.5, 2, 3), m) == pytest.approx(naive_fwhm(x, (1.5, 2, 3), m), rel=1e-12)
    series = np.stack([x, 2 * x + 1, x[::-1]], axis=-1)
    expect = np.nanmean([naive_fwhm(series[..., t], (1.5, 2, 3)) for t in range(3)], axis=0)
    assert qc.smoothness_fwhm(series, (1.5, 2, 3)) == pytest.approx(tuple(expect), rel=1e-12)
    got = qc.metrics(x, (1.5, 2, 3))
    finite = x[np.isfinite(x)].astype(np.float64)
    assert (got["min"], got["max"]) == (finite.min(), finite.max())
    assert (got["mean"], got["std"]) == pytest.approx((finite.mean(), finite.std()), rel=1e-12)
    assert got["nan_count"] == int(np.isnan(x).sum())


def test_display_range_from_a_subsample_of_a_large_volume(monkeypatch):
    monkeypatch.setattr(qc, "PERCENTILE_SAMPLES", 4096)  # 40 x 40 x 40: every 15th voxel
    x = np.random.default_rng(5).gamma(2.0, 50.0, (40, 40, 40)).astype(np.float32)
    exact = np.percentile(x, [1, 99.5])
    lo, hi = qc._limits(x, "input")
    assert lo == pytest.approx(exact[0], rel=0.1) and hi == pytest.approx(exact[1], rel=0.1)
    monkeypatch.setattr(qc, "PERCENTILE_SAMPLES", 10**9)  # small volumes: every voxel, exactly
    assert qc._limits(x, "input") == pytest.approx(tuple(exact))


def test_output_shares_the_input_display_range_only_while_it_fits():
    """A smoothed volume is drawn on the input's range (contrast change visible); a sharpened
    noisy one spreads far past it and gets its own range: np.percentile of its voxels."""
    rng = np.random.default_rng(3)
    z, y, x = np.mgrid[:40, :40, :40]
    phantom = np.where((z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 < 15**2, 1000.0, 100.0)
    noisy = (phantom + rng.normal(0, 60, phantom.shape)).astype(np.float32)
    in_lim = tuple(np.percentile(noisy, [1, 99.5]))
    for kind, params in (("gaussian", {"fwhm_mm": 4}), ("identity", {})):
        got_in, got_out, shared = qc.display_ranges(noisy, apply_filter(noisy, (1, 1, 1), kind, **params), kind)
        assert shared and got_out == got_in == pytest.approx(in_lim)
    for kind, params in (("sharpen", {"amount": 1.0}), ("emboss", {})):
        out = apply_filter(noisy, (1, 1, 1), kind, **params)
        own = np.percentile(out, [1, 99.5])
        assert own[1] - own[0] > 1.5 * (in_lim[1] - in_lim[0])  # the case this is about
        got_in, got_out, shared = qc.display_ranges(noisy, out, kind)
        assert not shared and got_in == pytest.approx(in_lim) and got_out == pytest.approx(tuple(own))
    edges = apply_filter(noisy, (1, 1, 1), "sobel")
    _, got_out, shared = qc.display_ranges(noisy, edges, "sobel")
    assert not shared and got_out == pytest.approx((0.0, np.percentile(edges, 99.5)))


def test_metrics_columns():
    x = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    x[0, 0, 0] = np.nan
    m = qc.metrics(x, (1, 1, 1))
    assert m["nan_count"] == 1 and m["min"] == 1 and m["max"] == 26
    assert [k for k in m if "fwhm" in k] == ["fwhm_x_mm", "fwhm_y_mm", "fwhm_z_mm"]


def test_to_ras_flips_and_permutes():
    data = np.arange(24, dtype=float).reshape(2, 3, 4)
    aff = np.array([[0, 0, -3.0, 0], [2.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # axes: A, S, L
    ras, vox = qc.to_ras(data, aff, (2.0, 1.0, 3.0))
    assert ras.shape == (4, 2, 3) and vox == (3.0, 2.0, 1.0)
    assert ras[0, 0, 0] == data[0, 0, 3]  # most left->right reversed


def _png_size(path):
    import struct

    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_volume_qc_figures_are_nonblank_sized_and_deterministic(nib_data, tmp_path):
    from pipeline.image import FilterJob, filter_file

    src = nib_data("anatomical.nii")
    specs = {"s6": {"kind": "gaussian", "fwhm_mm": 6}, "e": {"kind": "sobel"}}
    jobs = [
        FilterJob(s["kind"], {k: v for k, v in s.items() if k != "kind"}, str(tmp_path / f"{n}.nii.gz"))
        for n, s in specs.items()
    ]
    filter_file(src, jobs, backend="cpu", sidecars=False)
    before = {n: (tmp_path / f"{n}.nii.gz").read_bytes() for n in specs}
    derived = {n: (specs[n], str(tmp_path / f"{n}.nii.gz")) for n in specs}
    pngs = {n: str(tmp_path / f"{n}.png") for n in specs}
    rows = qc.volume_qc(src, derived, pngs, tmp_path / "m.tsv", "sub-01")
    assert {n: (tmp_path / f"{n}.nii.gz").read_bytes() for n in specs} == before  # QC never modifies
    assert _png_size(pngs["s6"]) == (1400, 640)
    from matplotlib.image import imread

    img = imread(pngs["s6"])
    assert img[..., :3].std() > 0.05  # not blank
    first = pathlib.Path(pngs["s6"]).read_bytes()
    qc.volume_qc(src, derived, pngs, tmp_path / "m2.tsv", "sub-01")
    assert pathlib.Path(pngs["s6"]).read_bytes() == first
    smooth = next(r for r in rows if r["filter"] == "s6")
    assert smooth["out_fwhm_x_mm"] > smooth["in_fwhm_x_mm"] + 3  # a 6 mm Gaussian raised the smoothness
    table = qc.read_tsv(tmp_path / "m.tsv")
    assert [r["filter"] for r in table] == ["s6", "e"]
    qc.group_qc([tmp_path / "m.tsv"], tmp_path / "g.tsv", tmp_path / "g.png")
    assert _png_size(tmp_path / "g.png") == (700, 600)
    assert len(qc.read_tsv(tmp_path / "g.tsv")) == 2


def test_a_series_figure_says_which_volume_its_slices_show(monkeypatch, rng):
    drawn = []
    monkeypatch.setattr(qc, "_save_png", lambda fig, path: drawn.append(fig._suptitle.get_text()))
    series = rng.normal(100, 5, (12, 10, 8, 7)).astype(np.float32)
    for data in (series, series[..., 0]):
        qc.qc_figure(data, data, np.eye(4), (1.0, 1.0, 1.0), "g", {"kind": "gaussian", "fwhm_mm": 4}, "unused.png")
    assert drawn == ["g: gaussian fwhm_mm=4 (slices of volume 1 of 7, histogram of all)", "g: gaussian fwhm_mm=4"]


def test_histogram_counts_are_labelled_as_plain_numbers():
    assert [qc._count_label(v) for v in (0.5, 1, 10, 100, 1e3, 2.5e4, 1e6, 1.6e7, 2e9)] == [
        "0.5", "1", "10", "100", "1k", "25k", "1M", "16M", "2G"
    ]  # fmt: skip


def test_filter_jobs_do_not_import_matplotlib(nib_data, tmp_path):
    code = (
        "import sys; from pipeline.cli import main; "
        f"rc = main(['apply', {nib_data('anatomical.nii')!r}, {str(tmp_path / 'o.nii.gz')!r}, '--filter', 'sobel']); "
        "print(rc, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "False"]


def test_qc_job_fits_its_memory_request(tmp_path, rng):
    """The workflow's mem_mb for a QC job covers the peak RSS of that job on a 74 MB series."""
    import nibabel as nib

    from pipeline import workflow as wf

    src = tmp_path / "bold.nii"
    series = rng.normal(1000, 10, (80, 80, 48, 60)).astype(np.float32)
    nib.save(nib.Nifti1Image(series, np.diag([3.0, 3.0, 3.0, 1.0])), src)
    del series
    filters = '{"g": {"kind": "gaussian", "fwhm_mm": 6}, "e": {"kind": "sobel"}, "s": {"kind": "sharpen"}}'
    outs = {n: tmp_path / f"{n}.nii" for n in "ges"}
    cli = [sys.executable, "-m", "pipeline"]
    subprocess.run([*cli, "batch", str(src), "--filters-json", filters, "--backend", "cpu", "--no-sidecar",
                    *[f"--output={n}={p}" for n, p in outs.items()]], check=True)  # fmt: skip
    qc_cmd = [*cli, "qc", str(src), "--filters-json", filters, *[f"--derived={n}={p}" for n, p in outs.items()],
              "--png=g=" + str(tmp_path / "g.png"), "--metrics", str(tmp_path / "m.tsv"), "--label", "b"]  # fmt: skip
    # A parent of its own, so that ru_maxrss of its children is this QC job's peak alone.
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " \
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)"  # fmt: skip
    peak_mb = int(subprocess.run([sys.executable, "-c", probe, *qc_cmd], check=True, capture_output=True,
                                 text=True).stdout.split()[-1])  # fmt: skip
    request = wf.qc_mem_mb(str(src))
    assert peak_mb <= request, (peak_mb, request)
    # The request is not the interpreter's baseline alone: the series (74 MB as float32) counts.
    assert request - wf.PYTHON_BASELINE_MB >= 3 * series_mb(src)


@pytest.mark.parametrize("held_in_a_cycle", [False, True])
def test_volume_qc_holds_one_derived_volume_at_a_time(held_in_a_cycle, nib_data, tmp_path, monkeypatch):
    """When a derived volume is read, the one before it is gone, also when the figure left it in a
    reference cycle (as a stored traceback's frames do) that only the cyclic collector frees."""
    import weakref

    from pipeline import io
    from pipeline.image import FilterJob, filter_file

    src = nib_data("example4d.nii.gz")
    specs = {"g": {"kind": "gaussian", "fwhm_mm": 6}, "e": {"kind": "sobel"}, "s": {"kind": "sharpen"}}
    derived = {n: (spec, str(tmp_path / f"{n}.nii.gz")) for n, spec in specs.items()}
    filter_file(src, [FilterJob(s["kind"], {k: v for k, v in s.items() if k != "kind"}, p) for s, p in derived.values()],
                backend="cpu", sidecars=False)  # fmt: skip
    loaded, alive_at_load = [], []
    real_load = io.load

    def load(path):
        alive_at_load.append(sum(ref() is not None for ref in loaded[1:]))  # derived ones only
        vol = real_load(path)
        loaded.append(weakref.ref(vol.data))
        return vol

    monkeypatch.setattr(io, "load", load)
    if held_in_a_cycle:
        real_figure = qc.qc_figure

        def figure_leaving_a_cycle(in_data, out_data, *args):
            cycle = [out_data]
            cycle.append(cycle)
            real_figure(in_data, out_data, *args)

        monkeypatch.setattr(qc, "qc_figure", figure_leaving_a_cycle)
    pngs = {n: str(tmp_path / f"{n}.png") for n in specs}
    qc.volume_qc(src, derived, pngs, str(tmp_path / "m.tsv"), "x")
    assert alive_at_load == [0, 0, 0, 0]


def series_mb(path):
    import nibabel as nib

    return 4 * int(np.prod(nib.load(path).shape)) / 2**20
