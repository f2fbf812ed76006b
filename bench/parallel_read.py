"""Would decompressing inputs on several threads pay? The serial reader against rapidgzip.

volfilter reads ``.nii.gz`` on one thread (ISA-L through ``isal``, 1 MiB at a time, as
``pipeline/io.py`` does). rapidgzip decodes any gzip file on several threads, but a chunk whose
preceding 32 KiB window is not yet known goes through its own slower decoder, so what it gains
depends on the data and the core count. On the 2-core VM (eleventh session) it was 1.2x faster on
a float32 volume that barely compresses and 2.2x slower on an int16 EPI series, so it was not
adopted. This script measures both kinds of file at 1, 2, 4, ... threads up to the machine's CPUs,
alternating the readers, for a machine with more cores (rapidgzip must be installed; it is not a
volfilter dependency):

    python bench/parallel_read.py [--size 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import nibabel as nib  # noqa: E402
from isal import igzip  # noqa: E402

from pipeline import io as vio  # noqa: E402


def read_all(fh, size: int) -> int:
    """Bytes read from ``fh`` the way volfilter reads a volume (``pipeline.io._read_exact``)."""
    with fh:
        return len(vio._read_exact(fh, size))


def files(tmp: str, n: int, rng) -> dict[str, tuple[str, int]]:
    x = ndi.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 3) * 50 + 100
    x += rng.normal(scale=2, size=x.shape).astype(np.float32)
    phantom = os.path.join(tmp, "phantom.nii.gz")
    vio.save(vio.derived_image(x, nib.Nifti1Image(x, np.eye(4))), phantom)
    epi = ndi.gaussian_filter(rng.normal(size=(64, 64, 40)).astype(np.float32), 2)[..., None] * 300 + 1000
    epi = epi + rng.normal(scale=10, size=(64, 64, 40, 200)).astype(np.float32)
    series = os.path.join(tmp, "bold.nii.gz")
    nib.save(nib.Nifti1Image(epi.astype(np.int16), np.diag([3, 3, 3.5, 1])), series)
    return {
        f"float32 {n}^3, volfilter's gzip": (phantom, x.nbytes + 352),
        "int16 EPI 64x64x40x200, nibabel's gzip": (series, epi.size * 2 + 352),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    try:
        import rapidgzip
    except ImportError:
        print("rapidgzip is not installed: nothing to compare (pip install rapidgzip)")
        return
    cpus = vio.usable_cpus()
    threads = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= cpus]
    print(f"# {cpus} CPUs, isal serial reader vs rapidgzip {rapidgzip.__version__}; medians of {args.repeat}, ms")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (path, size) in files(tmp, args.size, np.random.default_rng(0)).items():
            readers = {"serial": lambda p=path, s=size: read_all(igzip.open(p, "rb"), s)}
            for t in threads:
                readers[f"rapidgzip {t}"] = lambda p=path, s=size, t=t: read_all(
                    rapidgzip.open(p, parallelization=t), s
                )
            times = {name: [] for name in readers}
            for _ in range(args.repeat):
                for name, read in readers.items():
                    start = time.perf_counter()
                    assert read() == size
                    times[name].append((time.perf_counter() - start) * 1e3)
            serial = np.median(times["serial"])
            print(f"\n## {label}: {os.path.getsize(path) >> 20} MB compressed, {size >> 20} MB")
            for name, ts in times.items():
                print(f"{name:14s} {np.median(ts):8.1f} ms   {serial / np.median(ts):5.2f}x the serial reader")


if __name__ == "__main__":
    main()
