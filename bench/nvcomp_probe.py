"""Would deflating on the GPU pay? nvCOMP's Deflate and Gzip codecs against volfilter's ISA-L writer.

The GPU batch target of issue 6 is held by gzip on the host: both paths wait on ISA-L. This probe
compresses the data bytes of one filtered 256^3 float32 volume on the device, in independent
chunks, makes each chunk one gzip member (a multi-member gzip file, which gzip, zlib's gzread,
Python's gzip and isal read as one stream), and prints for each codec setting: the device time
with the download of the compressed chunks, the host's assembly (header, CRC-32 and length of each
member), the size against ISA-L level 1, whether it decompresses to the same bytes and whether a
second run gives the same file. Then volfilter's own writer on one thread and on every CPU, for
the same bytes. Nothing here is used by the pipeline; nvCOMP is not a dependency.

    python bench/nvcomp_probe.py [--size 256] [--chunk-kib 64] [--repeat 5]
    python bench/nvcomp_probe.py --stand-in   # no GPU: zlib on the host in place of nvCOMP,
                                              # to check the assembly and the read-back
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import statistics
import struct
import sys
import time
import zlib

import numpy as np
import scipy.ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import io as vio  # noqa: E402

try:
    from isal import isal_zlib as crc_impl  # the CRC-32 the writer uses (PCLMUL)
except ImportError:  # pragma: no cover
    crc_impl = zlib

HEADER = vio._GZIP_HEADER


def members(pieces, chunks) -> bytes:
    """A multi-member gzip file: each raw deflate piece with a header and its chunk's CRC-32 and length."""
    out = bytearray()
    for piece, chunk in zip(pieces, chunks, strict=True):
        out += HEADER
        out += piece
        out += struct.pack("<II", crc_impl.crc32(chunk), len(chunk) & 0xFFFFFFFF)
    return bytes(out)


def median_ms(fn, repeat):
    fn()  # warm-up: first calls compile or allocate
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), min(times)


def volume(n):
    rng = np.random.default_rng(0)
    x = ndi.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 3) * 50 + 100
    x += rng.normal(scale=2, size=x.shape).astype(np.float32)
    return np.asfortranarray(ndi.gaussian_filter(x, 6 / 2.3548))  # what a smoothing job writes


def isal_ms(data: bytes, threads: int, repeat: int):
    def write():
        buf = io.BytesIO()
        vio.GZIP_THREADS = threads
        gz = vio._GzipStream(buf)  # cuts the bytes into 1 MiB blocks, as a volume's save does
        gz.write(data)
        gz.close()
        return buf.getvalue()

    return median_ms(write, repeat), len(write())


def device_cases(raw: bytes, x: np.ndarray, chunk: int, repeat: int, stand_in: bool, wanted: list[str]):
    offsets = list(range(0, len(raw), chunk))
    sizes = [min(chunk, len(raw) - o) for o in offsets]
    host_chunks = [memoryview(raw)[o : o + s] for o, s in zip(offsets, sizes, strict=True)]
    if stand_in:
        settings = [("zlib level 1 on the host (stand-in)", None)]
    else:
        import cupy

        nvcomp = _import_nvcomp()

        dev = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        print(f"nvCOMP {nvcomp.__version__} on {dev}; CuPy {cupy.__version__}")
        flat = cupy.asarray(np.frombuffer(raw, np.uint8))
        batch = nvcomp.as_arrays(flat, offsets, sizes)
        settings = [(f"{alg} algorithm_type {t}", (alg, int(t))) for alg, t in (w.split(":") for w in wanted)]
    for name, setting in settings:
        try:
            if setting is None:

                def encode():
                    return [zlib.compress(c, 1, wbits=-15) for c in host_chunks]

            else:
                alg, t = setting
                codec = nvcomp.Codec(algorithm=alg, algorithm_type=t, bitstream_kind=nvcomp.BitstreamKind.RAW)

                def encode(codec=codec):
                    host = codec.encode(batch).cpu()  # waits for the device; compressed chunks only
                    return [np.asarray(host[i]).tobytes() for i in range(len(host))]

            (dev_med, dev_min), pieces = median_ms(encode, repeat), encode()
            (asm_med, _), out = median_ms(lambda p=pieces: join(p, host_chunks), repeat), join(pieces, host_chunks)
            same = gzip.decompress(out) == raw  # every member, each CRC-32 checked
            again = join(encode(), host_chunks) == out
            print(
                f"{name:40s} device+download {dev_med:7.2f} ms (min {dev_min:.2f}), assembly {asm_med:6.2f} ms, "
                f"{len(out) / len(raw):.3f} of the input, {len(pieces)} members, reads back: {same}, "
                f"same bytes twice: {again}"
            )
            if setting is not None and setting[0] == "Gzip":  # whole members: the slots are the file
                contiguous(codec, batch, flat, len(offsets), out, repeat, name, nvcomp, cupy)
        except Exception as exc:  # each setting on its own: one the library refuses does not stop the rest
            print(f"{name:40s} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if not stand_in:
        (up, _) = median_ms(lambda: cupy.asarray(x).ravel("K"), repeat)
        (down, _) = median_ms(lambda: cupy.asnumpy(flat), repeat)
        (crc, _) = median_ms(lambda: [crc_impl.crc32(c) for c in host_chunks], repeat)
        print(f"for scale: upload {up:.2f} ms, download of the uncompressed volume {down:.2f} ms, "
              f"host CRC-32 of every chunk (one thread) {crc:.2f} ms")  # fmt: skip


def contiguous(codec, batch, flat, n, expected, repeat, name, nvcomp, cupy):
    """The same encode into one device buffer made beforehand (a slot per chunk), the compressed
    sizes read once, one download into page-locked memory, and the slots joined on the host."""
    align = max(codec.get_required_compression_alignment(), 16)
    cap = -(-codec.get_max_comp_buffer_size(nvcomp.as_array(flat[: len(flat) // n])) // align) * align
    slots = cupy.empty(n * cap, cupy.uint8)
    out = nvcomp.as_arrays(slots, [i * cap for i in range(n)], [cap] * n)
    pinned = np.frombuffer(cupy.cuda.alloc_pinned_memory(n * cap), np.uint8, n * cap)

    def device_only():
        done = codec.encode(batch, out=out)
        done[0]  # waits for the device
        return done

    def to_host():
        sizes = device_only().buffer_sizes
        slots.get(out=pinned)
        return sizes

    def whole():
        sizes = to_host()
        return b"".join(pinned[i * cap : i * cap + k] for i, k in enumerate(sizes))

    dev, _ = median_ms(device_only, repeat)
    down, _ = median_ms(to_host, repeat)
    total, low = median_ms(whole, repeat)
    same = whole() == expected
    print(f"{name + ', one buffer':40s} device {dev:.2f} ms, +sizes and one download {down:.2f} ms, "
          f"+join {total:.2f} ms (min {low:.2f}); same file as above: {same}")  # fmt: skip


def _import_nvcomp():
    """``nvidia.nvcomp``, also where its wheel went into another folder than the other ``nvidia`` packages."""
    try:
        from nvidia import nvcomp
    except ImportError:
        import nvidia

        for folder in sys.path:
            candidate = os.path.join(folder, "nvidia")
            if os.path.isdir(os.path.join(candidate, "nvcomp")) and candidate not in nvidia.__path__:
                nvidia.__path__.append(candidate)
        from nvidia import nvcomp
    return nvcomp


def join(pieces, host_chunks) -> bytes:
    """The file: the Gzip codec's pieces are whole members already; raw deflate pieces get wrapped."""
    return b"".join(pieces) if pieces[0][:3] == b"\x1f\x8b\x08" else members(pieces, host_chunks)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--chunk-kib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--stand-in", action="store_true")
    ap.add_argument("--settings", default="Gzip:0,Gzip:1,Gzip:2,Deflate:1", help="ALGORITHM:TYPE,...")
    args = ap.parse_args()
    x = volume(args.size)
    raw = x.tobytes(order="F")
    print(f"{x.shape} float32 smoothed phantom, {len(raw) / 2**20:.0f} MiB, chunks of {args.chunk_kib} KiB; "
          f"{vio.usable_cpus()} CPUs")  # fmt: skip
    for threads in sorted({1, vio.usable_cpus()}):  # first: the baseline must not be cut off
        (med, low), size = isal_ms(raw, threads, args.repeat)
        print(f"{'volfilter writer (ISA-L level 1), ' + str(threads) + ' threads':40s} {med:7.2f} ms (min {low:.2f}), "
              f"{size / len(raw):.3f} of the input")  # fmt: skip
    device_cases(raw, x, args.chunk_kib << 10, args.repeat, args.stand_in, args.settings.split(","))


if __name__ == "__main__":
    main()
