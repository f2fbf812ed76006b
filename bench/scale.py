"""Scale check: peak memory of one `volfilter apply` process on large volumes.

    python bench/scale.py            # 512^3 float32 (512 MB) and a 64x64x40x200 4-D series

Prints the data size, the peak RSS of the process (getrusage of the child) and wall time, so the
memory model in pipeline.io.working_bytes (the figure the workflow requests as mem_mb) can be
checked against reality.
"""

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from pipeline.io import working_bytes  # noqa: E402


def run(args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"volfilter failed with status {status}")
    return wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main():
    print(f"{'case':<40} {'data MB':>8} {'peak RSS MB':>12} {'mem_mb asked':>13} {'wall s':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape, fname in [("512^3 float32, gaussian FWHM 6", (512, 512, 512), "big.nii"),
                                    ("64x64x40x200 float32, gaussian FWHM 6", (64, 64, 40, 200), "series.nii.gz")]:  # fmt: skip
            src = os.path.join(tmp, fname)
            # Written by a child: ru_maxrss survives fork+exec, so this process must stay small.
            make = (f"import numpy as np, nibabel as nib; d = np.random.default_rng(0).normal(100, 10, {shape!r})"
                    f".astype(np.float32); nib.save(nib.Nifti1Image(d, np.eye(4)), {src!r})")  # fmt: skip
            subprocess.run([sys.executable, "-c", make], check=True)
            wall, peak = run(["apply", src, os.path.join(tmp, "out.nii.gz"), "--filter", "gaussian", "--fwhm-mm", "6",
                              "--backend", "cpu", "--no-sidecar"])  # fmt: skip
            mb = np.prod(shape) * 4 / 2**20
            asked = working_bytes(shape) / 2**20 + 400
            print(f"{label:<40} {mb:8.0f} {peak:12.0f} {asked:13.0f} {wall:7.1f}", flush=True)
            os.unlink(src)


if __name__ == "__main__":
    main()
