"""Where one in-process batch spends its time: cProfile of ``pipeline.image.filter_files``.

    python bench/breakdown.py --backend gpu --batch 2     # after one warm-up call, so no compile time

First the batch's wall time without and with reading ahead (pipeline.image.READ_AHEAD), twice
each, alternated; then the profile. It complements bench.py's ratios with the breakdown behind them (decompression, upload, kernels,
download, compression), the same three filters as bench.py's end-to-end cases, on the same kind of
synthetic 256^3 phantom. No timings are asserted anywhere; this prints them.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nibabel as nib  # noqa: E402

from pipeline import image  # noqa: E402
from pipeline.image import FilterJob, filter_files  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ext", default=".nii.gz", choices=(".nii.gz", ".nii"), help="of the input and the outputs")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.size
    x = ndi.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 3) * 50 + 100
    x += rng.normal(scale=2, size=x.shape).astype(np.float32)
    tmp = tempfile.mkdtemp(prefix="volfilter-breakdown-")
    try:
        src = os.path.join(tmp, "vol" + args.ext)
        nib.save(nib.Nifti1Image(np.asfortranarray(x), np.eye(4)), src)
        kinds = (("gaussian", {"fwhm_mm": 6}), ("sobel", {}), ("sharpen", {}))
        many = [(src, [FilterJob(k, p, f"{tmp}/{k}{i}{args.ext}") for k, p in kinds], None) for i in range(args.batch)]
        filter_files(many, backend=args.backend, sidecars=False)  # warm-up: imports, kernel compilation
        for ahead in (False, True, False, True):  # alternated: both settings meet the same phases of the host
            image.READ_AHEAD = ahead
            t = time.perf_counter()
            filter_files(many, backend=args.backend, sidecars=False)
            ms = (time.perf_counter() - t) * 1e3
            print(
                f"# {args.batch} volumes of {n}^3 ({args.ext}), backend {args.backend}, read ahead {ahead}: {ms:.0f} ms"
            )
        image.READ_AHEAD = None
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        filter_files(many, backend=args.backend, sidecars=False)
        prof.disable()
        wall = (time.perf_counter() - t) * 1e3
        print(
            f"# {args.batch} volumes of {n}^3 ({args.ext}), 3 filters each, backend {args.backend}: {wall:.0f} ms under cProfile"
        )
        stats = pstats.Stats(prof, stream=sys.stdout).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
