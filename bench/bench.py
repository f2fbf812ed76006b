"""volfilter benchmark: baseline vs ours, measured side by side in one run.

Prints a table (case, baseline ms, ours ms, ratio, peak MB) and the machine it ran on.

    python bench/bench.py                 # CPU cases, 256^3 synthetic + nibabel's real images
    python bench/bench.py --size 128      # smaller, quicker
    python bench/bench.py --gpu           # add GPU cases (CuPy and a device needed), run first
    python bench/bench.py --gpu-only --batch 2   # the GPU cases alone: fits a short device session

Baselines are what a user would otherwise write: scipy.ndimage single-threaded and nibabel's
default .nii.gz reader/writer, in the same process and on the same data; end-to-end cases run
fresh processes for both sides. Peak MB is the largest extra allocation during "ours" (tracemalloc,
which sees NumPy's buffers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from functools import partial

import numpy as np
import scipy.ndimage as ndi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))  # the textbook references the tests check against

import nibabel as nib  # noqa: E402
from reference import naive_fwhm  # noqa: E402

from pipeline import io as vio  # noqa: E402
from pipeline.backend import cpu_kernels as compiled_kernels  # noqa: E402
from pipeline.backend import gpu_available  # noqa: E402
from pipeline.filters import apply_filter  # noqa: E402

ROWS = []
fast_cpu_kernels = compiled_kernels()  # pipeline.native, or None where it was not built


def best_ms(fn, repeat=3):
    fn()  # warm-up (imports, caches, CuPy kernel compilation)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times)


def paired_ms(base, ours, repeat=5):
    """Best of ``repeat`` for each side, run alternately so both meet the same phases of a shared machine."""
    base()
    ours()
    b, o = [], []
    for _ in range(repeat):
        for fn, times in ((base, b), (ours, o)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return min(b), min(o)


def peak_mb(fn):
    if fast_cpu_kernels is not None:
        fast_cpu_kernels.release_buffers()  # the output counts as new memory, not a reused buffer
    tracemalloc.start()
    tracemalloc.reset_peak()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def row(case, base_ms, ours_ms, peak=None, note=""):
    ratio = base_ms / ours_ms if ours_ms > 0 else float("nan")
    ROWS.append((case, base_ms, ours_ms, ratio, peak, note))
    p = "" if peak is None else f"{peak:8.0f}"
    print(f"{case:<44} {base_ms:10.1f} {ours_ms:10.1f} {ratio:7.2f}x {p:>8} {note}", flush=True)


def header(title):
    print(f"\n## {title}\n{'case':<44} {'base ms':>10} {'ours ms':>10} {'ratio':>8} {'peak MB':>8}", flush=True)


SIGMA6 = 6.0 / np.sqrt(8 * np.log(2))


def baseline_sobel_mag(x):
    return np.sqrt(sum(ndi.sobel(x, axis=a) ** 2 for a in range(3)))


def epi_series(rng):
    """A synthetic fMRI run: 200 volumes of 64x64x40, a smooth image plus noise, float32."""
    series = ndi.gaussian_filter(rng.normal(size=(64, 64, 40)).astype(np.float32), 2)[..., None] * 300 + 1000
    return series + rng.normal(scale=10, size=(64, 64, 40, 200)).astype(np.float32)


def sharpen_kernel():
    """The 3x3x3 stencil of volfilter's sharpen (amount 1), written out as a user would for scipy."""
    k = np.zeros((3, 3, 3), np.float32)
    k[1, 1, 1] = 7
    for a in range(3):
        for s in (0, 2):
            i = [1, 1, 1]
            i[a] = s
            k[tuple(i)] = -1
    return k


def cpu_kernels(x):
    header(f"CPU kernels, {x.shape} float32, 1 mm voxels (baseline: scipy.ndimage, 1 thread)")
    vox = (1.0, 1.0, 1.0)
    sharp_k = sharpen_kernel()
    cases = [
        (
            "gaussian FWHM 6 mm",
            lambda: ndi.gaussian_filter(x, SIGMA6),
            lambda: apply_filter(x, vox, "gaussian", fwhm_mm=6),
        ),
        ("sobel magnitude", lambda: baseline_sobel_mag(x), lambda: apply_filter(x, vox, "sobel")),
        ("sharpen (3x3x3 correlate)", lambda: ndi.correlate(x, sharp_k), lambda: apply_filter(x, vox, "sharpen")),
        ("box 3 vox", lambda: ndi.uniform_filter(x, 3), lambda: apply_filter(x, vox, "box")),
    ]
    for name, base, ours in cases:
        row(name, *paired_ms(base, ours, 9), peak_mb(ours))
        if name.startswith("gaussian") and fast_cpu_kernels is not None:
            # Above, each output reuses the memory of the one before (pipeline.native._empty), as a
            # job's second and third filter do; here each goes to new memory, as a job's first does.
            pool = fast_cpu_kernels.POOL_MAX
            fast_cpu_kernels.POOL_MAX = 0
            fast_cpu_kernels.release_buffers()
            try:
                row(name + ", output in new memory", *paired_ms(base, ours, 9))
            finally:
                fast_cpu_kernels.POOL_MAX = pool
    # Within a brain-sized mask: normalised convolution, as a user would write it with scipy.ndimage.
    n = x.shape[0]
    zz, yy, xx = np.indices(x.shape, sparse=True)
    mask = np.asfortranarray(((zz - n / 2) ** 2 + (yy - n / 2) ** 2 + (xx - n / 2) ** 2) < (0.4 * n) ** 2)

    def base_masked():
        valid = np.isfinite(x) & mask
        num = ndi.gaussian_filter(np.where(valid, x, np.float32(0)), SIGMA6)
        den = ndi.gaussian_filter(valid.astype(np.float32), SIGMA6)
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 far outside the mask
            out = num / den
        out[~mask] = 0
        return out

    def ours_masked():
        return apply_filter(x, vox, "gaussian", fwhm_mm=6, mask=mask)

    a, b = base_masked(), ours_masked()
    diff = float(np.abs(a[mask] - b[mask]).max() / np.abs(a[mask]).max())
    note = f"max rel. difference {diff:.1e}" + ("" if np.array_equal(a[~mask], b[~mask]) else "; outside differs")
    row("gaussian FWHM 6 mm within a mask", *paired_ms(base_masked, ours_masked, 5), peak_mb(ours_masked), note)
    # An fMRI run in process: 200 small volumes, which the kernels split over threads by volume.
    series = np.asfortranarray(epi_series(np.random.default_rng(1)))
    epi = (3.0, 3.0, 3.5)
    sigma = [SIGMA6 / h for h in epi]

    def base_series():
        return np.stack([ndi.gaussian_filter(series[..., t], sigma) for t in range(series.shape[3])], axis=-1)

    def ours_series():
        return apply_filter(series, epi, "gaussian", fwhm_mm=6)

    row("gaussian FWHM 6 mm, 200 x 64x64x40 at 3 mm", *paired_ms(base_series, ours_series, 3), peak_mb(ours_series))


def real_kernels():
    """The kernels on real MRI: the first volume of nibabel's example4d (an EPI volume, anisotropic
    voxels), against what a user would write with scipy.ndimage for the same result in mm."""
    from pipeline.example import nibabel_data_file
    from pipeline.kernels import SOBEL_RAMP_GAIN

    vol = vio.load(str(nibabel_data_file("example4d.nii.gz")))
    x = vol.data[..., 0]
    vox = vol.voxel_mm
    header(f"CPU kernels on real MRI: example4d's first volume, {x.shape}, voxels {tuple(round(h, 2) for h in vox)} mm")
    sigma = [SIGMA6 / h for h in vox]
    sharp_k = sharpen_kernel()

    def base_sobel():
        return np.sqrt(sum((ndi.sobel(x, axis=a) / np.float32(SOBEL_RAMP_GAIN * vox[a])) ** 2 for a in range(3)))

    cases = [
        (
            "gaussian FWHM 6 mm",
            lambda: ndi.gaussian_filter(x, sigma),
            lambda: apply_filter(x, vox, "gaussian", fwhm_mm=6),
        ),
        ("sobel magnitude, per mm", base_sobel, lambda: apply_filter(x, vox, "sobel")),
        ("sharpen (3x3x3 correlate)", lambda: ndi.correlate(x, sharp_k), lambda: apply_filter(x, vox, "sharpen")),
    ]
    for name, base, ours in cases:
        a, b = base(), ours()
        note = f"max rel. difference {float(np.abs(a - b).max() / np.abs(a).max()):.1e}"
        row(name, *paired_ms(base, ours, 25), peak_mb(ours), note)


def textbook_qc_metrics(x, voxel_mm, mask):
    """QC metrics as first written: float64 copies and boolean indexing (tests/reference.py's estimator)."""
    finite = x[np.isfinite(x)]
    stats = (finite.min(), finite.max(), finite.mean(), finite.std(), int(np.isnan(x).sum()))
    return naive_fwhm(x, voxel_mm, mask), stats


def qc_cases(x):
    """The per-volume work of a QC job (metrics, display range, histogram), textbook NumPy vs ours."""
    from pipeline import qc

    header(f"QC of one volume, {x.shape} float32 (baseline: the textbook NumPy forms)")
    y = np.asfortranarray(ndi.gaussian_filter(x, 2))  # a smoother volume, Fortran-ordered as loaded
    mask = qc.foreground_mask(x)
    vox = (1.0, 1.0, 1.0)
    base, ours = paired_ms(lambda: textbook_qc_metrics(y, vox, mask), lambda: qc.metrics(y, vox, mask), 3)
    row("smoothness + intensity metrics", base, ours)
    edges = np.linspace(float(y.min()), float(y.max()), 80)
    base, ours = paired_ms(lambda: np.histogram(y[np.isfinite(y)], bins=edges), lambda: qc._histogram(y, edges), 5)
    row("histogram, 79 bins", base, ours)
    base, ours = paired_ms(lambda: np.percentile(y[np.isfinite(y)], [1, 99.5]), lambda: qc._limits(y, "input"), 5)
    row("display range (1st, 99.5th percentile)", base, ours, note="ours: strided subsample past 2^20 voxels")


def gzip_io(x, tmp):
    header(f"NIfTI .nii.gz I/O, {x.shape} float32 ({x.nbytes / 2**20:.0f} MB)")
    img = nib.Nifti1Image(np.asfortranarray(x), np.eye(4))
    runs = iter(range(10**6))

    def fresh(name):  # every write makes a new file, as a workflow job does (no cost of replacing one)
        return os.path.join(tmp, f"{name}{next(runs)}.nii.gz")

    def base_write():
        nonlocal ref
        ref = fresh("ref")
        nib.save(img, ref)

    def ours_write():
        nonlocal ours_path
        ours_path = fresh("ours")
        vio.save(vio.derived_image(x, img), ours_path)

    ref = ours_path = None
    base_w, ours_w = paired_ms(base_write, ours_write, 7)
    row(
        "write .nii.gz (nibabel default zlib-1)",
        base_w,
        ours_w,
        note=f"{os.path.getsize(ref) >> 20} vs {os.path.getsize(ours_path) >> 20} MB",
    )
    base_r, ours_r = paired_ms(lambda: nib.load(ref).get_fdata(dtype=np.float32), lambda: vio.load(ref).data, 7)
    row("read .nii.gz", base_r, ours_r)
    same = np.array_equal(nib.load(ours_path).get_fdata(dtype=np.float32), x)
    print(
        f"   read back by nibabel identical: {same}; gzip -t: {subprocess.run(['gzip', '-t', ours_path]).returncode == 0}"
    )


BASELINE_SCRIPT = """
import sys, numpy as np, nibabel as nib, scipy.ndimage as ndi
src, outdir = sys.argv[1], sys.argv[2]
ext = sys.argv[3] if len(sys.argv) > 3 else ".nii.gz"
img = nib.load(src); x = img.get_fdata(dtype=np.float32)
h = nib.affines.voxel_sizes(img.affine)[:3]
s = 6.0 / np.sqrt(8 * np.log(2))
def per_vol(f):
    return np.stack([f(x[..., t]) for t in range(x.shape[3])], -1) if x.ndim == 4 else f(x)
g = per_vol(lambda v: ndi.gaussian_filter(v, s / h))
e = per_vol(lambda v: np.sqrt(sum((ndi.sobel(v, axis=a) / (32 * h[a])) ** 2 for a in range(3))))
k = np.zeros((3, 3, 3)); k[1, 1, 1] = 7
for a in range(3):
    for sd in (0, 2):
        i = [1, 1, 1]; i[a] = sd; k[tuple(i)] = -1
sh = per_vol(lambda v: ndi.correlate(v, k))
for name, d in (("g", g), ("e", e), ("s", sh)):
    nib.save(nib.Nifti1Image(d.astype(np.float32), img.affine, img.header), f"{outdir}/{name}{ext}")
"""

FILTERS_JSON = '{"g": {"kind": "gaussian", "fwhm_mm": 6}, "e": {"kind": "sobel"}, "s": {"kind": "sharpen"}}'


# The environment the workflow gives its jobs on top of the caller's (rules/common.smk: OpenBLAS's
# idle worker threads would spin at import); the baseline script runs as a user would run it.
JOB_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def child_env():
    """The environment of a benchmarked child process: this checkout importable first."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}


def run_ms(cmd, extra_env=None):
    env = {**child_env(), **(extra_env or {})}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return (time.perf_counter() - t) * 1e3


def end_to_end(inputs, tmp, label, backend="cpu", n_batch=8):
    header(f"End to end, fresh processes: load .nii.gz -> gaussian+sobel+sharpen -> 3 x .nii.gz ({label})")
    base_script = os.path.join(tmp, "baseline.py")
    with open(base_script, "w") as fh:
        fh.write(BASELINE_SCRIPT)
    runs = iter(range(10**6))

    def fresh_dir():  # every run writes new files, as a workflow job does (no cost of replacing old ones)
        d = os.path.join(tmp, "e2e", str(next(runs)))
        os.makedirs(d)
        return d

    def base(src, ext=".nii.gz"):
        return [sys.executable, base_script, src, fresh_dir(), ext]

    def ours(src, ext=".nii.gz"):
        out = fresh_dir()
        return [sys.executable, "-m", "pipeline", "batch", src, "--filters-json", FILTERS_JSON, "--backend", backend,
                "--no-sidecar"] + [f"--output={n}={out}/o{n}{ext}" for n in "ges"]  # fmt: skip

    def ours_one_process(src, n):  # n volumes in one process: volfilter batch --volumes-json (volumes_per_job)
        out = fresh_dir()
        volumes = [{"input": src, "outputs": {v: f"{out}/o{v}{i}.nii.gz" for v in "ges"}} for i in range(n)]
        return [sys.executable, "-m", "pipeline", "batch", "--filters-json", FILTERS_JSON, "--backend", backend,
                "--no-sidecar", "--volumes-json", json.dumps(volumes)]  # fmt: skip

    def interleaved(src, n, ext=".nii.gz", ours_env=None):
        """Baseline and ours alternately, so that both meet the same phases of a shared machine."""
        b, o = [], []
        for _ in range(n):
            b.append(run_ms(base(src, ext)))
            o.append(run_ms(ours(src, ext), {**JOB_ENV, **(ours_env or {})}))
        return b, o

    for src in inputs:
        b, o = interleaved(src, 3)
        row(f"one volume: {os.path.basename(src)} [{backend}]", min(b), min(o))
    # The workflow's compress: false, against the same script writing .nii: no gzip on either side.
    b, o = interleaved(inputs[0], 3, ".nii")
    row(f"one volume, 3 x .nii out: {os.path.basename(inputs[0])} [{backend}]", min(b), min(o))
    if backend == "cpu":
        # Without the compiled kernels (no C compiler at install): scipy.ndimage does the filtering.
        b, o = interleaved(inputs[0], 3, ours_env={"VOLFILTER_NO_NATIVE": "1"})
        row(f"one volume, scipy.ndimage path: {os.path.basename(inputs[0])}", min(b), min(o))
    b, o = interleaved(inputs[0], n_batch)
    row(f"{n_batch} volumes, one process each [{backend}]", sum(b), sum(o))
    row(
        f"{n_batch} volumes, one process for all [{backend}]",
        sum(b),
        run_ms(ours_one_process(inputs[0], n_batch), JOB_ENV),
    )
    if backend == "cpu":
        # As the workflow runs them: one thread per job, as many jobs at once as cores (Snakemake -cN);
        # against the same sequential baseline runs (the plain script is single-threaded).
        n_cores = os.cpu_count() or 1
        env = {**child_env(), **JOB_ENV}
        t = time.perf_counter()
        for start in range(0, n_batch, n_cores):
            procs = [subprocess.Popen([*ours(inputs[0]), "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL) for _ in range(min(n_cores, n_batch - start))]  # fmt: skip
            if any(p.wait() != 0 for p in procs):
                raise RuntimeError("a concurrent batch job failed")
        row(f"{n_batch} volumes, {n_cores} jobs at a time, 1 thread each", sum(b), (time.perf_counter() - t) * 1e3)
    shutil.rmtree(os.path.join(tmp, "e2e"), ignore_errors=True)


def batch_ms(src, jobs, n_batch, out_ext):
    """Best of 2 for ``filter_files`` on ``n_batch`` copies of ``src`` (outputs ``out_ext``): CPU path, GPU path."""
    from pipeline.image import FilterJob, filter_files

    many = [(src, [FilterJob(j.kind, j.params, j.output.replace(".nii.gz", f"{i}{out_ext}")) for j in jobs], None)
            for i in range(n_batch)]  # fmt: skip
    return tuple(best_ms(partial(filter_files, many, backend=be, sidecars=False), 2) for be in ("cpu", "gpu"))


def gpu_cases(x, tmp, n_batch=2):
    import cupy
    import cupyx.scipy.ndimage as cndi

    dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    header(f"GPU kernels on {dev}, {x.shape} float32 (baseline: cupyx.scipy.ndimage called directly)")
    g = cupy.asarray(x)
    vox = (1.0, 1.0, 1.0)

    def sync(fn):
        def run():
            fn()
            cupy.cuda.Device().synchronize()

        return run

    cases = [  # (row, cupyx.scipy.ndimage called directly, our filter and its parameters)
        ("gaussian FWHM 6 mm", lambda: cndi.gaussian_filter(g, SIGMA6), ("gaussian", {"fwhm_mm": 6})),
        ("sobel magnitude", lambda: cupy.sqrt(sum(cndi.sobel(g, axis=a) ** 2 for a in range(3))), ("sobel", {})),
        ("sharpen", lambda: g - cndi.laplace(g), ("sharpen", {})),
    ]
    on_device = {}  # our filters on the device, ms: also the GPU side of the in-memory rows below
    for name, base, (kind, params) in cases:
        base_ms = best_ms(sync(base), 5)
        on_device[name] = best_ms(sync(partial(apply_filter, g, vox, kind, **params)), 5)
        row(name, base_ms, on_device[name])
    up = best_ms(sync(lambda: cupy.asarray(x)), 5)
    down = best_ms(lambda: cupy.asnumpy(g), 5)
    row("host->device upload vs device->host download", up, down, note="(not a ratio: two transfers)")
    header("GPU vs CPU path, same machine, in process (load .nii.gz, 3 filters, 3 writes)")
    img = vio.derived_image(x, nib.Nifti1Image(x, np.eye(4)))
    src = os.path.join(tmp, "vol.nii.gz")
    vio.save(img, src)
    from pipeline.image import FilterJob, filter_file

    jobs = [FilterJob("gaussian", {"fwhm_mm": 6}, f"{tmp}/a.nii.gz"), FilterJob("sobel", {}, f"{tmp}/b.nii.gz"),
            FilterJob("sharpen", {}, f"{tmp}/c.nii.gz")]  # fmt: skip
    cpu = best_ms(lambda: filter_file(src, jobs, backend="cpu", sidecars=False), 2)
    gpu = best_ms(lambda: filter_file(src, jobs, backend="gpu", sidecars=False), 2)
    row("one volume, CPU path vs GPU path", cpu, gpu)
    cpu, gpu = batch_ms(src, jobs, n_batch, ".nii.gz")
    row(f"{n_batch} volumes in one call, CPU path vs GPU path", cpu, gpu, note="(the GPU batch target: >= 5x)")
    # The two restatements of that target the README proposes: the same batch without gzip, and
    # the kernels alone (a host array through the CPU path, a device array through the GPU path).
    raw = os.path.join(tmp, "vol.nii")
    vio.save(img, raw)
    cpu, gpu = batch_ms(raw, jobs, n_batch, ".nii")
    row(f"{n_batch} volumes, one call, .nii in/out, CPU vs GPU", cpu, gpu, note="(no gzip)")
    for name, _, (kind, params) in cases:
        row(
            f"{name}, in memory: CPU vs GPU", best_ms(partial(apply_filter, x, vox, kind, **params), 5), on_device[name]
        )
    first = ("import numpy as np; from pipeline import apply_filter; from pipeline.backend import resolve; "
             "import cupy; be = resolve('gpu'); x = cupy.asarray(np.ones((64, 64, 64), np.float32)); "
             "apply_filter(x, (1, 1, 1), 'gaussian', fwhm_mm=6); apply_filter(x, (1, 1, 1), 'sobel'); "
             "apply_filter(x, (1, 1, 1), 'sharpen'); cupy.cuda.Device().synchronize()")  # fmt: skip
    empty_cache = tempfile.mkdtemp(prefix="cupy-cache-")
    os.environ["CUPY_CACHE_DIR"] = empty_cache
    cold = run_ms([sys.executable, "-c", first])
    warm = run_ms([sys.executable, "-c", first])
    del os.environ["CUPY_CACHE_DIR"]
    row("fresh process, 3 GPU filters: cold vs warm kernel cache", cold, warm, note="(CuPy's on-disk cache)")


CPU_SECTIONS = ("cpu_kernels", "real_kernels", "gzip_io", "qc_cases", "end_to_end")


def cpu_description() -> str:
    """The CPU model from /proc/cpuinfo (Linux), with its family/model numbers and whether it has
    AVX2 and AVX-512: one VM kind has come on more than one CPU, and the baselines differ by CPU."""
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read().split("\n\n")[0]
    except OSError:
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    simd = ", ".join(name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f")) if flag in flags) or "no AVX2"
    return f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; {simd})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--gpu", action="store_true", help="add the GPU sections (run first)")
    ap.add_argument("--gpu-only", action="store_true", help="the GPU sections alone, for a short device session")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--batch", type=int, default=8, help="volumes in the batch case")
    ap.add_argument(
        "--only",
        default=",".join(CPU_SECTIONS),
        help=f"comma-separated CPU sections to run (default all: {','.join(CPU_SECTIONS)})",
    )
    args = ap.parse_args()
    only = set(args.only.split(","))
    if only - set(CPU_SECTIONS):
        ap.error(f"--only: unknown section(s) {', '.join(sorted(only - set(CPU_SECTIONS)))}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}, scipy {__import__('scipy').__version__}, nibabel {nib.__version__}, gzip {vio.GZIP_BACKEND}")  # fmt: skip
    print(f"# cpu: {cpu_description()}")
    rng = np.random.default_rng(0)
    n = args.size
    # A smooth phantom plus noise: compresses like MRI, not like white noise.
    x = ndi.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 3) * 50 + 100
    x += rng.normal(scale=2, size=x.shape).astype(np.float32)
    x = np.asfortranarray(x, dtype=np.float32)
    tmp = tempfile.mkdtemp(prefix="volfilter-bench-")
    try:
        synth = os.path.join(tmp, f"synth{n}.nii.gz")
        nib.save(nib.Nifti1Image(x, np.eye(4)), synth)
        if (args.gpu or args.gpu_only) and not gpu_available():
            print("\n# GPU sections skipped: CuPy or a CUDA device is not available")
        elif args.gpu or args.gpu_only:  # first, so that a run cut short by its time limit still has them
            gpu_cases(x, tmp, args.batch)
            if not args.skip_e2e:
                end_to_end([synth], tmp, "GPU backend", backend="gpu", n_batch=args.batch)
        if args.gpu_only:
            return
        for name, section in (
            ("cpu_kernels", lambda: cpu_kernels(x)),
            ("real_kernels", real_kernels),
            ("gzip_io", lambda: gzip_io(x, tmp)),
            ("qc_cases", lambda: qc_cases(x)),
        ):
            if name in only:
                section()
        if not args.skip_e2e and "end_to_end" in only:
            from pipeline.example import nibabel_data_file

            real = str(nibabel_data_file("example4d.nii.gz"))
            bold = os.path.join(tmp, "bold64x64x40x200.nii.gz")  # an fMRI run: int16, 3 mm, 200 volumes
            nib.save(nib.Nifti1Image(epi_series(rng).astype(np.int16), np.diag([3, 3, 3.5, 1])), bold)
            label = f"synthetic {n}^3, a synthetic 200-volume EPI series and nibabel's example4d"
            end_to_end([synth, bold, real], tmp, label, n_batch=args.batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
