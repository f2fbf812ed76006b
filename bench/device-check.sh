#!/usr/bin/env bash
# Everything a short GPU-machine session should measure, in one command, from the repo root:
# the device and CuPy, the GPU tests, the GPU sections of bench/bench.py (device kernels against
# cupyx.scipy.ndimage, transfers, cold/warm kernel cache, fresh-process and in-process CPU vs GPU
# on the same host), deflate on the device (bench/nvcomp_probe.py), a cProfile breakdown of both
# paths (bench/breakdown.py), then parallel decompression (bench/parallel_read.py), most needed
# first. Results go to $OUT (or bench/), each step under its own time limit so that one hang does
# not take the rest. The compiled CPU kernels are used when a
# pipeline/_native*.so built on any CPython is beside the package (carry it along).
set -u
export PYTHONUNBUFFERED=1  # a step cut at its limit still leaves what it printed
out=${OUT:-bench}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import cupy, numpy, scipy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__)"
  python3 -c "from pipeline.backend import cpu_kernels; print('compiled CPU kernels:', cpu_kernels() is not None)"
} 2>&1 | tee "$out/gpu-device.txt"
timeout "${TESTS_S:-240}" python3 -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu-tests.log" | tail -5
timeout "${BENCH_S:-300}" python3 bench/bench.py --gpu-only --batch "${BATCH:-2}" ${BENCH_ARGS:-} 2>&1 | tee "$out/gpu-bench.txt"
# Deflate on the device (nvCOMP), where its wheels came along (nvidia-nvcomp-cu13, nvidia-libnvcomp-cu13).
timeout "${NVCOMP_S:-90}" python3 bench/nvcomp_probe.py 2>&1 | tee "$out/nvcomp.txt"
for be in gpu cpu; do  # where the in-process time goes, both paths on this host
  timeout "${BREAKDOWN_S:-60}" python3 bench/breakdown.py --backend $be --batch "${BATCH:-2}" --top 15 2>&1
done > "$out/gpu-breakdown.txt"
# Parallel decompression of inputs (not adopted on 2 cores): measured where rapidgzip's wheel came along
# (bash ../shared/gpu/prepare-wheels.sh rapidgzip).
timeout "${READ_S:-120}" python3 bench/parallel_read.py 2>&1 | tee "$out/parallel-read.txt"
