"""The compiled kernels equal scipy.ndimage (the plain path) and do not depend on the thread count."""

import numpy as np
import pytest
from conftest import filter_params
from numpy.testing import assert_allclose, assert_array_equal

from pipeline import apply_filter
from pipeline.backend import cpu_kernels
from pipeline.filters import FILTERS, MODES

fast = cpu_kernels()
pytestmark = pytest.mark.skipif(fast is None, reason="pipeline._native was not built (no C compiler at install)")

VOX = (1.0, 1.5, 2.5)


@pytest.mark.parametrize("name", list(FILTERS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order", ["C", "F"])
def test_fast_path_equals_scipy_path(name, mode, order, rng, tmp_path, monkeypatch):
    x = np.asarray(rng.normal(100, 30, (19, 16, 13)).astype(np.float32), order=order)
    params = filter_params(name, tmp_path)
    ours = apply_filter(x, VOX, name, mode=mode, **params)
    import pipeline.filters as filters

    monkeypatch.setattr(filters, "fast_cpu", lambda a: None)
    ref = apply_filter(x, VOX, name, mode=mode, **params)
    scale = float(np.abs(ref).max())
    assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)
    if name != "identity":
        assert ours.flags.f_contiguous == (order == "F")  # Fortran in, Fortran out: no transpose on save


@pytest.mark.parametrize("name", ["gaussian", "box", "sobel", "sharpen", "emboss", "unsharp"])
def test_results_identical_whatever_the_thread_count(name, rng):
    # Above the kernels' 2**20-voxel threshold for going parallel; planes are handed out dynamically.
    x = np.asfortranarray(rng.normal(size=(72, 128, 120)).astype(np.float32))
    assert x.size >= 2**20
    params = {"fwhm_mm": 5.0} if name in ("gaussian", "unsharp") else {}
    outs = []
    for n in (1, 2, 3):
        fast.set_threads(n)
        outs.append(apply_filter(x, VOX, name, **params))
    fast.set_threads(None)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", ["gaussian", "sobel", "sharpen", "unsharp"])
def test_series_of_small_volumes_split_over_threads_by_volume(name, rng, monkeypatch):
    """An fMRI-sized series: the volumes go to the kernels' threads one each, with the bits of one
    thread, including volumes with NaN and a mask (the missing-data path)."""
    import pipeline.filters as filters

    x = np.asfortranarray(rng.normal(100, 20, (20, 18, 12, 7)).astype(np.float32))
    x[3:6, 4:8, 2:5, 2] = np.nan
    x[..., 4] = np.nan  # a volume without a finite voxel
    mask = np.ones(x.shape[:3], bool)
    mask[:, :, 10:] = False
    params = {"fwhm_mm": 5.0} if name in ("gaussian", "unsharp") else {}
    calls = []
    real = filters._volume_threads
    monkeypatch.setattr(filters, "_volume_threads", lambda d: calls.append(real(d)) or calls[-1])
    for run in (None, 3):  # the volumes a thread takes in a row: what _volume_run gives (1 here), and 3
        if run:
            monkeypatch.setattr(filters, "_volume_run", lambda shape, workers, run=run: run)
        for m in (None, mask):
            outs = []
            for n in (1, 2, 3):
                fast.set_threads(n)
                outs.append(apply_filter(x, VOX, name, mask=m, **params))
            fast.set_threads(None)
            alone = np.stack([apply_filter(x[..., t], VOX, name, mask=m, **params) for t in range(x.shape[3])], -1)
            assert all(np.array_equal(o, alone, equal_nan=True) for o in outs)
    assert calls == [1, 2, 3, 1, 2, 3] * 2
    big = np.zeros((128, 128, 64, 2), np.float32)  # 2**20 voxels a volume: the kernels split each one
    assert real(big) == 1 and real(x[..., :1]) == 1


@pytest.mark.parametrize(
    "shape, workers, run",
    [((64, 64, 40, 200), 2, 3), ((20, 18, 12, 7), 2, 1), ((64, 64, 40, 10), 2, 1), ((8, 8, 8, 1000), 2, 125),
     ((8, 8, 8, 1000), 16, 15), ((300, 300, 300, 4), 2, 1)],
)  # fmt: skip
def test_volumes_taken_in_runs_of_2_mb_and_a_quarter_share_at_most(shape, workers, run):
    import pipeline.filters as filters

    assert filters._volume_run(shape, workers) == run


def test_qc_sums_identical_whatever_the_thread_count(rng):
    x = np.asfortranarray(rng.normal(size=(72, 128, 121)).astype(np.float32))
    x[5:9, 10:20, 30:40] = np.nan
    x[60, 3, 2] = -np.inf
    mask = np.ones(x.shape, bool)
    mask[:, :, :7] = False
    outs = []
    for n in (1, 2, 3):
        fast.set_threads(n)
        outs.append((fast.fwhm_sums(x, mask), fast.fwhm_sums(x), fast.finite_stats(x)))
    fast.set_threads(None)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize("size", [1, 3, 4, 5, 65536, 2 * 65536 + 3, 1100003])
def test_finite_stats_equal_numpy(size, rng):
    """Counts, extremes exactly; mean and squared deviations to float64 rounding. Sizes around the
    four-voxel steps and the 65536-voxel blocks, and one past the size where threads split the work."""
    x = rng.normal(900, 40, size).astype(np.float32)
    if size > 3:
        idx = rng.choice(size, max(3, size // 7), replace=False)
        x[idx[0::3]], x[idx[1::3]], x[idx[2::3]] = np.nan, np.inf, -np.inf
        x[-1] = np.nan  # in the tail after the last step of four
    n, nans, lo, hi, mean, ss = fast.finite_stats(x)
    fin = x[np.isfinite(x)].astype(np.float64)
    assert (n, nans) == (fin.size, int(np.isnan(x).sum()))
    assert (lo, hi) == (fin.min(), fin.max())
    assert mean == pytest.approx(fin.mean(), rel=1e-12)
    assert ss == pytest.approx(float(((fin - fin.mean()) ** 2).sum()), rel=1e-10, abs=1e-9)


def test_finite_stats_of_nothing_finite():
    x = np.array([np.nan, np.inf, -np.inf, np.nan, np.nan], np.float32)
    n, nans, lo, hi, mean, ss = fast.finite_stats(x)
    assert (n, nans, lo, hi, ss) == (0, 3, np.inf, -np.inf, 0.0) and np.isnan(mean)


@pytest.mark.parametrize("order", ["C", "F"])
def test_histogram_equals_numpy_with_the_same_edges(order, rng):
    """Values on the edges (ties), at the closed top edge, outside the range, NaN and Inf; 4-D too."""
    x = np.asarray(rng.integers(-5, 85, (30, 20, 12, 3)).astype(np.float32), order=order)
    x[0, 0, 0, :] = [np.nan, np.inf, -np.inf]
    edges = np.linspace(0.0, 79.0, 80)  # every integer value in range lies on an edge
    assert np.array_equal(fast.histogram(x, edges), np.histogram(x, bins=edges)[0])
    # Uneven edges, many on data values: the bin guessed from the mean spacing is several off and
    # the checks against the edges move it, through ties.
    widths = rng.uniform(0.3, 1.7, 79)
    edges = np.r_[0.0, np.cumsum(widths) * (79.0 / widths.sum())]
    edges[1:-1:2] = np.round(edges[1:-1:2])
    edges = np.unique(edges)
    assert np.array_equal(fast.histogram(x, edges), np.histogram(x, bins=edges)[0])
    y = np.asarray(rng.normal(40, 25, (32, 24, 16)).astype(np.float32), order=order)
    edges = np.linspace(-3.7, 61.3, 80)
    assert np.array_equal(fast.histogram(y, edges), np.histogram(y, bins=edges)[0])


def test_histogram_identical_whatever_the_thread_count(rng):
    x = np.asfortranarray(rng.normal(size=(72, 128, 120)).astype(np.float32))
    edges = np.linspace(-3.0, 3.0, 80)
    outs = []
    for n in (1, 2, 3):
        fast.set_threads(n)
        outs.append(fast.histogram(x, edges))
    fast.set_threads(None)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
    assert np.array_equal(outs[0], np.histogram(x, bins=edges)[0])


def _scipy_separable(x, weights, mode):
    import scipy.ndimage as ndi

    out = x.astype(np.float64)
    for axis, w in enumerate(weights):
        out = ndi.correlate1d(out, np.asarray(w, np.float64), axis=axis, mode=mode)
    return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(37, 45, 70), (5, 33, 17), (24, 1, 40), (9, 6, 1), (4, 3, 2), (67, 128, 125)])
def test_separable_kernel_equals_scipy_correlate1d(mode, shape, rng):
    """Odd row counts (the row-pair code's leftover), widths off the 8/16/32 blocks, kernels longer than an axis
    (rows of 1 and 2 voxels too: their padding comes from a table worked out once per call).

    (67, 128, 125) is over 2**20 voxels, where a short symmetric kernel along the first axis takes
    the one-sweep path (separable_ring: runs of 32 planes, 2 at a time; 67 leaves a run of 3).
    """
    x = rng.normal(100, 30, shape).astype(np.float32)
    cases = [
        [fast.gaussian_weights(2.5), fast.gaussian_weights(1.2), fast.gaussian_weights(3.3)],  # symmetric
        [np.array([0.1, 0.5, 0.2], np.float32), np.array([1.0], np.float32), np.array([0.3, 0.3, -0.4, 1.0, 0.2])],
        [np.full(3, 1 / 3, np.float32), np.array([0.2, 0.5, 0.3], np.float32), fast.gaussian_weights(0.8)],
    ]
    for weights in cases:
        ours = fast.separable(x, weights, mode)
        ref = _scipy_separable(x, weights, mode)
        assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))


@pytest.mark.parametrize("mode", MODES)
def test_large_volume_with_a_long_kernel_equals_scipy_whatever_the_thread_count(mode, rng):
    """From 2**21 voxels on, the separable filter's first sweep stores its output past the caches
    (sym_cols' streaming stores); 41 taps along the first axis keep it off the one-sweep path. Rows
    of 136 floats start on 16 bytes but not all on a cache line and end in a tail of 8; 121 rows
    leave one over after the row pairs: streamed and plain stores share cache lines."""
    x = rng.normal(100, 30, (131, 121, 136)).astype(np.float32)
    assert x.size >= 2 * 2**20
    weights = [fast.gaussian_weights(5.0), fast.gaussian_weights(0.8), fast.gaussian_weights(1.5)]
    assert weights[0].size == 41
    ref = _scipy_separable(x, weights, mode)
    outs = []
    for n in (1, 2, 3):
        fast.set_threads(n)
        outs.append(fast.separable(x, weights, mode))
    fast.set_threads(None)
    assert_allclose(outs[0], ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


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


_SAME_BITS_SCRIPT = """
import sys, numpy as np
from pipeline import apply_filter
from pipeline.backend import cpu_kernels
from pipeline.filters import FILTERS
assert cpu_kernels() is not None
x = np.asfortranarray(np.random.default_rng(7).normal(100, 30, (23, 40, 37)).astype(np.float32))
x[3, 4, 5] = np.nan  # the missing-data path too
np.save(sys.argv[2] + "/k.npy", np.arange(27.0).reshape(3, 3, 3) - 13)
params = {"gaussian": {"fwhm_mm": 5.0}, "unsharp": {"fwhm_mm": 3.0}, "kernel": {"kernel_file": sys.argv[2] + "/k.npy"}}
out = {n: apply_filter(x, (1.0, 1.3, 2.0), n, **params.get(n, {})) for n in FILTERS}
big = np.asfortranarray(np.random.default_rng(8).normal(100, 30, (125, 128, 67)).astype(np.float32))  # > 2**20
out["gaussian_large"] = apply_filter(big, (1.0, 1.0, 2.5), "gaussian", fwhm_mm=4.0)  # one sweep (short along k)
out["box_large"] = apply_filter(big, (1.0, 1.0, 1.0), "box", size_vox=3)
big2 = np.random.default_rng(9).normal(100, 30, (131, 121, 136)).astype(np.float32)  # > 2**21, streamed
out["gaussian_streamed"] = apply_filter(big2, (1.0, 1.0, 1.0), "gaussian", fwhm_mm=12.0)  # 41 taps: two sweeps
fast = cpu_kernels()  # the QC sums: 37 x 40 x 23 as C-ordered planes, rows of 23 (a tail after steps of 4)
mask = np.ones(x.shape, bool)
mask[:, :6, :] = False
out["fwhm_sums"] = np.array([fast.fwhm_sums(x, m)[:2] + tuple(sum(fast.fwhm_sums(x, m)[2:], [])) for m in (None, mask)])
out["finite_stats"] = np.array(fast.finite_stats(x) + fast.finite_stats(big))
np.savez(sys.argv[1], **out)
"""


def test_a_baseline_x86_64_build_gives_the_same_bits(tmp_path):
    """Reproducible on any CPU: the source built for plain x86-64 (no AVX2, no FMA; what an old or a
    different CPU runs) gives bit-identical results for every filter to the build installed here."""
    import platform
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    cc = shutil.which("gcc") or shutil.which("cc")
    if platform.machine() != "x86_64" or cc is None:
        pytest.skip("needs x86-64 and a C compiler")
    src = Path(__file__).resolve().parents[1] / "pipeline" / "_native.c"
    lib = tmp_path / "baseline.so"
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-march=x86-64", "-mtune=generic"]
    cmd = [cc, *flags, "-DVF_BASELINE_ONLY", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}"]
    subprocess.run([*cmd, str(src), "-o", str(lib)], check=True, capture_output=True)
    results = {}
    for name, extra in (("installed", {}), ("baseline", {"VOLFILTER_NATIVE_LIB": str(lib)})):
        out = tmp_path / f"{name}.npz"
        env = {**__import__("os").environ, **extra}
        subprocess.run([sys.executable, "-c", _SAME_BITS_SCRIPT, str(out), str(tmp_path)], check=True, env=env)
        results[name] = np.load(out)
    for filt in results["installed"].files:
        a, b = results["installed"][filt], results["baseline"][filt]
        assert a.tobytes() == b.tobytes(), f"{filt}: baseline x86-64 build differs"


def _package_copy(tmp_path, library_name, edit_source=False):
    """pipeline/ copied to tmp_path with the built library under ``library_name``."""
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "pipeline"
    dst = tmp_path / "pipeline"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "_native*.so"))
    shutil.copy(fast._path, dst / library_name)
    if edit_source:
        with open(dst / "_native.c", "a") as fh:
            fh.write("/* a later version */\n")
    return dst


_WHICH_KERNELS = """
import warnings, numpy as np
warnings.simplefilter("always")
from pipeline import apply_filter, backend
k = backend.cpu_kernels()
print(k._path if k else "scipy")
x = np.asfortranarray(np.random.default_rng(1).normal(size=(12, 10, 8)).astype(np.float32))
np.save("out.npy", apply_filter(x, (1, 1, 2), "gaussian", fwhm_mm=3))
"""


def _which_kernels(package_parent):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("VOLFILTER_NATIVE_LIB", "VOLFILTER_NO_NATIVE")}
    env["PYTHONPATH"] = str(package_parent)
    proc = subprocess.run([sys.executable, "-c", _WHICH_KERNELS], cwd=package_parent, env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    return proc.stdout.strip(), proc.stderr, np.load(package_parent / "out.npy")


def test_installed_library_records_its_source():
    import hashlib
    from pathlib import Path

    source = Path(__file__).resolve().parents[1] / "pipeline" / "_native.c"
    fast._lib.vf_source_sha256.restype = __import__("ctypes").c_char_p
    assert fast._lib.vf_source_sha256().decode() == hashlib.sha256(source.read_bytes()).hexdigest()


def test_library_built_for_another_python_is_used(tmp_path):
    # A Snakemake conda env's Python runs the checkout's code: its library carries another ABI tag.
    pkg = _package_copy(tmp_path, "_native.cpython-39-x86_64-linux-gnu.so")
    used, err, out = _which_kernels(tmp_path)
    assert used == str(pkg / "_native.cpython-39-x86_64-linux-gnu.so"), err
    x = np.asfortranarray(np.random.default_rng(1).normal(size=(12, 10, 8)).astype(np.float32))
    assert np.array_equal(out, apply_filter(x, (1, 1, 2), "gaussian", fwhm_mm=3))


def test_library_built_from_older_source_is_not_used(tmp_path):
    # The checkout was updated (pipeline/_native.c changed) and not rebuilt: the old library could be
    # called with the new arguments. It is refused with a warning, and scipy.ndimage does the work.
    _package_copy(tmp_path, fast._path.rsplit("/", 1)[1], edit_source=True)
    used, err, out = _which_kernels(tmp_path)
    assert used == "scipy"
    assert "built from another version of pipeline/_native.c" in err and err.count("RuntimeWarning") == 1
    x = np.asfortranarray(np.random.default_rng(1).normal(size=(12, 10, 8)).astype(np.float32))
    assert_allclose(out, apply_filter(x, (1, 1, 2), "gaussian", fwhm_mm=3), rtol=1e-5, atol=1e-5)


def test_current_library_preferred_to_a_stale_one_beside_it(tmp_path):
    # The checkout's source changed; a library rebuilt from it (here for another CPython) sits beside
    # the stale one for this interpreter: the current one is used, whatever the names' order.
    import hashlib
    import shutil
    import subprocess
    import sysconfig

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("needs a C compiler")
    stale_name = fast._path.rsplit("/", 1)[1]
    pkg = _package_copy(tmp_path, stale_name, edit_source=True)
    digest = hashlib.sha256((pkg / "_native.c").read_bytes()).hexdigest()
    current = pkg / "_native.cpython-99-x86_64-linux-gnu.so"  # sorts after the stale one
    cmd = [cc, "-O1", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", f'-DVF_SOURCE_SHA256="{digest}"',
           f"-I{sysconfig.get_paths()['include']}", str(pkg / "_native.c"), "-o", str(current)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted([stale_name, current.name])[0] == stale_name
    used, err, out = _which_kernels(tmp_path)
    assert used == str(current), err
    assert "RuntimeWarning" not in err


_KERNEL_CALLS = {
    "separable, one sweep": lambda x: fast.separable(x, [fast.gaussian_weights(0.8)] * 3),
    "separable, two sweeps": lambda x: fast.separable(x, [fast.gaussian_weights(2.5)] * 3),
    "separable, small volume": lambda x: fast.separable(x[:9, :10, :11], [fast.gaussian_weights(2.5)] * 3),
    "gradient": lambda x: fast.gradient(x, (1.0, 1.0, 1.0), "magnitude", (1.0, 2.0, 1.0)),
    "gradient along k": lambda x: fast.gradient(x, (1.0, 1.0, 1.0), 0, (1.0, 2.0, 1.0)),
    "gradient along j": lambda x: fast.gradient(x, (1.0, 1.0, 1.0), 1, (1.0, 1.0, 1.0)),
    "gradient along i": lambda x: fast.gradient(x, (1.0, 1.0, 1.0), 2, (1.0, 2.0, 1.0)),
    "sharpen": lambda x: fast.sharpen(x, 1.0),
    "correlate": lambda x: fast.correlate(x, np.arange(27, dtype=np.float32).reshape(3, 3, 3) - 13),
}


@pytest.mark.parametrize("call", list(_KERNEL_CALLS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_kernels_refuse_non_finite_input_as_they_read_it(call, bad, rng):
    """The kernels check finiteness while reading (no pass of its own): a NaN or infinity anywhere,
    the first voxel, the last or one inside, with any thread count, gives NonFiniteInput."""
    x = rng.normal(100, 30, (67, 128, 125)).astype(np.float32)  # over 2**20 voxels: threads, both sweeps
    x[5, 7, 9] = 3.4e38  # large but finite
    fn = _KERNEL_CALLS[call]
    fn(x)  # finite: no complaint
    small = call.endswith("small volume")
    for where in [(0, 0, 0), (8, 9, 10) if small else (66, 127, 124), (4, 3, 2) if small else (40, 64, 3)]:
        y = x.copy()
        y[where] = bad
        for n in (1, 2, 3):
            fast.set_threads(n)
            with pytest.raises(fast.NonFiniteInput):
                fn(y)
    fast.set_threads(None)


@pytest.mark.parametrize(
    "name, params",
    [
        ("gaussian", {"fwhm_mm": 5.0}),  # 7 taps along the 2.5 mm axis: the one-sweep path
        ("gaussian", {"fwhm_mm": 12.0}),  # the two sweeps
        ("box", {}),
        ("sobel", {}),
        ("prewitt", {"axis": "2"}),
        ("sharpen", {}),
        ("unsharp", {"fwhm_mm": 4.0}),
        ("emboss", {}),
    ],
)
def test_missing_data_found_by_the_kernels_gives_the_same_result(name, params, rng, monkeypatch):
    """A volume with NaN and infinity, filtered with the kernels' own check, equals the same volume
    filtered after a separate finiteness pass (the missing-data path, as before the check moved)."""
    import pipeline.filters as filters

    x = np.asfortranarray(rng.normal(100, 30, (72, 128, 120)).astype(np.float32))
    x[0, 0, 0] = np.nan
    x[40, 50, 60] = np.inf
    x[71, 127, 119] = np.nan
    ours = apply_filter(x, VOX, name, **params)
    monkeypatch.setattr(filters, "_KERNELS_CHECK_FINITE", frozenset())
    ref = apply_filter(x, VOX, name, **params)
    assert np.isnan(ours[0, 0, 0]) and np.isnan(ours[40, 50, 60]) and np.isnan(ours[71, 127, 119])
    assert np.array_equal(ours, ref, equal_nan=True)
    assert ours.flags.f_contiguous


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("mask_order", [None, "C", "F"])
def test_missing_data_passes_equal_their_numpy_forms(order, mask_order, rng):
    """The missing-data path's single passes in C equal the NumPy steps they replace, bit for bit."""
    x = np.asarray(rng.normal(100, 30, (67, 128, 125)).astype(np.float32), order=order)  # > 2**20: threads
    x[rng.random(x.shape) < 0.05] = np.nan
    x[0, 0, 0], x[-1, -1, -1] = np.inf, -np.inf
    mask = None if mask_order is None else np.asarray(rng.random(x.shape) < 0.7, order=mask_order)
    valid = np.isfinite(x) if mask is None else np.isfinite(x) & mask

    w, filled, n_valid = fast.missing_prepare(x, mask)
    assert n_valid == int(valid.sum())
    assert np.array_equal(w, valid.astype(np.float32)) and np.array_equal(filled, np.where(valid, x, np.float32(0)))
    assert w.flags.f_contiguous == filled.flags.f_contiguous == (order == "F")

    count = rng.random(x.shape).astype(np.float32) * (rng.random(x.shape) < 0.5)
    total = rng.normal(50, 10, x.shape).astype(np.float32)
    grow = (w == 0) & (count > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        expect_filled = np.where(grow, total / count, filled)
    expect_w = np.where(grow, np.float32(1), w)
    assert fast.fill_ring(filled, w, count, total) == int(grow.sum())
    assert np.array_equal(filled, expect_filled) and np.array_equal(w, expect_w)

    out = np.asarray(rng.normal(size=x.shape).astype(np.float32), order=order)
    den = np.asarray(rng.random(x.shape).astype(np.float32), order=order)
    expect = out / den
    expect[~np.isfinite(x)] = np.nan
    if mask is not None:
        expect[~mask] = 0
    fast.missing_finish(out, x, mask, den)
    assert np.array_equal(out, expect, equal_nan=True)


@pytest.mark.parametrize("name", ["gaussian", "sobel", "sharpen", "unsharp"])
def test_masked_result_keeps_the_input_order_whatever_the_mask_order(name, rng):
    x = np.asfortranarray(rng.normal(100, 30, (40, 37, 29)).astype(np.float32))
    x[rng.random(x.shape) < 0.05] = np.nan
    mask = rng.random(x.shape) < 0.8
    params = {"fwhm_mm": 4.0} if name in ("gaussian", "unsharp") else {}
    a = apply_filter(x, VOX, name, mask=np.ascontiguousarray(mask), **params)
    b = apply_filter(x, VOX, name, mask=np.asfortranarray(mask), **params)
    assert a.flags.f_contiguous and b.flags.f_contiguous  # Fortran in, Fortran out: no transpose on save
    assert np.array_equal(a, b, equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 5, 5), (5, 0, 5), (5, 5, 0)])
def test_empty_volume_gives_an_empty_result_like_the_scipy_path(shape, tmp_path, monkeypatch):
    """A volume with no voxels: an empty float32 result for every filter (it used to stop the
    process with SIGFPE in the kernels' border mapping), as scipy.ndimage's path gives."""
    import pipeline.filters as filters

    for name in FILTERS:
        params = filter_params(name, tmp_path)
        for x, mask in [
            (np.zeros(shape, np.float32), None),
            (np.full(shape, np.nan, np.float32), np.ones(shape, bool)),
        ]:
            out = apply_filter(x, VOX, name, mask=mask, **params)
            assert out.shape == shape and out.dtype == np.float32
    monkeypatch.setattr(filters, "fast_cpu", lambda a: None)
    assert apply_filter(np.zeros(shape, np.float32), VOX, "sobel").shape == shape


_OUTPUT_CALLS = {**_KERNEL_CALLS, "axpby": lambda x: fast.axpby(x, x, 2.0, -1.0)}


@pytest.mark.parametrize("call", list(_OUTPUT_CALLS))
@pytest.mark.parametrize("order", ["C", "F"])
def test_kernel_outputs_start_on_a_cache_line(call, order, rng):
    """The kernels write into arrays that start on a 64-byte boundary (NumPy's own start 16 bytes
    in), are exactly the input's shape and memory order, and own nothing past their last voxel."""
    x = np.asarray(rng.normal(size=(20, 24, 28)).astype(np.float32), order=order)
    out = _OUTPUT_CALLS[call](x)
    seen = x[:9, :10, :11] if "small" in call else x  # a strided view: filtered from a C-ordered copy
    assert out.ctypes.data % 64 == 0
    assert out.flags.f_contiguous if seen.flags.f_contiguous else out.flags.c_contiguous
    assert out.dtype == np.float32 and out.shape == seen.shape
    assert _owner(out).raw.nbytes - out.nbytes < 64


def _owner(a):
    """The object that owns a kernel output's buffer, past the views over it."""
    while not hasattr(a, "raw"):
        a = a.base
    return a


@pytest.mark.parametrize("call", list(_OUTPUT_CALLS))
def test_outputs_reuse_memory_let_go_and_only_that(call, rng, monkeypatch):
    """An output's buffer is reused once no array uses it; the next output is then written in full
    (the buffer is poisoned with NaN first) and equals one written into fresh memory, bit for bit."""
    monkeypatch.setattr(fast, "_POOL", [])
    x = np.asfortranarray(rng.normal(size=(67, 128, 125)).astype(np.float32))  # over 2**20: threads, ring
    y = np.asfortranarray(rng.normal(size=(67, 128, 125)).astype(np.float32))
    monkeypatch.setattr(fast, "POOL_MAX", 0)
    fresh = _OUTPUT_CALLS[call](y)
    monkeypatch.setattr(fast, "POOL_MAX", 2)
    first = _OUTPUT_CALLS[call](x)
    kept = first[2:, 3:]  # a view keeps the buffer in use
    buffer = _owner(kept).raw.ctypes.data
    del first
    assert fast._POOL == []
    second = _OUTPUT_CALLS[call](y)
    assert not np.shares_memory(kept, second)
    assert_array_equal(second, fresh)
    del kept
    assert [b.ctypes.data for b in fast._POOL] == [buffer]
    fast._POOL[0][:] = np.nan
    third = _OUTPUT_CALLS[call](y)
    assert fast._POOL == [] and _owner(third).raw.ctypes.data == buffer  # the poisoned buffer
    assert_array_equal(third, fresh)
    del second, third
    assert len(fast._POOL) == 2
    fast.release_buffers()
    assert fast._POOL == []
