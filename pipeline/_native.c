/* volfilter's fused, multithreaded CPU kernels (OpenMP), loaded with ctypes by pipeline/native.py.
 *
 * Arrays are C-ordered float32 volumes (nz, ny, nx); x is the contiguous axis. Border modes follow
 * scipy.ndimage: 0 reflect, 1 mirror, 2 nearest, 3 wrap, 4 constant (zero). Every output voxel is
 * computed by one thread in a fixed order, and the build forbids fused multiply-add contraction
 * (-ffp-contract=off), so the bits do not depend on the thread count or the CPU's vector width.
 * Work is handed out dynamically (two planes or chunks at a time): which thread computes a voxel
 * does not change its bits, and a core that is busy elsewhere (another job, a noisy neighbour on a
 * VM) does not hold the others up: 256^3 Gaussian, 2 threads, one core busy: 59-63 ms static,
 * 39-50 ms dynamic.
 * Hot loops are compiled twice (AVX2 and baseline x86-64) and chosen at load time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/mman.h>
#ifdef __SSE__
#include <xmmintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* -DVF_BASELINE_ONLY builds plain x86-64 code only (no AVX2 clones): what a CPU without AVX2 runs. The tests compare its bits with the normal build's. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(VF_BASELINE_ONLY)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* Loops without branches over values that may be NaN or infinite are compiled assuming that
 * floating-point operations do not trap (which changes no value, only what may happen to the
 * exception flags), so that they vectorise. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_TRAP __attribute__((optimize("no-trapping-math")))
#else
#define NO_TRAP
#endif

/* Volumes smaller than this many voxels (a 64x64x40 EPI volume has 164k) run on the calling thread:
 * splitting ~1 ms of work costs more than it saves, and a thread team that has to wait for a core
 * busy with gzip (ISA-L's writer threads run meanwhile) made a 200-volume series 1 s slower. */
#define PARALLEL_MIN (1 << 20)

/* Flat passes over a volume hand out blocks of this many voxels (dynamically, 16 at a time). */
#define BLOCK 65536

/* Volumes of this many voxels or more are written by the separable filter's first sweep with
 * stores that bypass the caches (see sym_cols): more than fits in the caches, the output would
 * be read back from memory anyway. */
#define STREAM_MIN (2 * PARALLEL_MIN)

/* A transparent huge page of x86-64 Linux: the unit in which outputs are first touched (see
 * plane_chunk) and in which alloc_huge rounds its buffers. */
#define HUGE_PAGE ((int64_t)2 << 20)

static inline int64_t map_index(int64_t idx, int64_t n, int mode) {
    if (idx >= 0 && idx < n) return idx;
    if (mode == 4) return -1;
    if (mode == 2) return idx < 0 ? 0 : n - 1;
    if (mode == 3) { int64_t m = idx % n; return m < 0 ? m + n : m; }
    if (mode == 0) { int64_t p = 2 * n, m = idx % p; if (m < 0) m += p; return m < n ? m : p - m - 1; }
    if (n == 1) return 0;
    { int64_t p = 2 * n - 2, m = idx % p; if (m < 0) m += p; return m < n ? m : p - m; }
}

/* Where the 2r padding elements of a row of n come from: edge[p] = map_index(p - r) for the left
 * ones (p < r), edge[r + p] = map_index(n + p) for the right ones; -1 stands for a zero (constant
 * mode). The same for every row of an axis, so each kernel works it out once per call (malloc'ed;
 * NULL when out of memory) instead of per row: map_index divides, and a 64x64x40 Gaussian spent
 * 13% of its time padding rows (perf). */
static int64_t *edge_table(int64_t n, int64_t r, int mode) {
    int64_t *edge = malloc((size_t)(2 * r + 1) * sizeof(int64_t));
    if (edge)
        for (int64_t p = 0; p < r; p++) {
            edge[p] = map_index(p - r, n, mode);
            edge[r + p] = map_index(n + p, n, mode);
        }
    return edge;
}

static void pad_row(const float *row, float *pad, int64_t n, int64_t r, const int64_t *edge) {
    memcpy(pad + r, row, (size_t)n * sizeof(float));
    for (int64_t p = 0; p < r; p++) {
        pad[p] = edge[p] >= 0 ? row[edge[p]] : 0.0f;
        pad[r + n + p] = edge[r + p] >= 0 ? row[edge[r + p]] : 0.0f;
    }
}

CLONES static void axpy(float *restrict out, const float *restrict s, float w, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] += w * s[i];
}

/* Inside a parallel region: record whether this thread's buffers were allocated, wait for all
 * threads, and tell every thread the same answer (so all of them take, or skip, the work-sharing loop). */
static int all_allocated(int ok, int *failed) {
    if (!ok) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int f;
#pragma omp atomic read
    f = *failed;
    return !f;
}

/* The filters check that their input is finite while they read it, instead of in a pass of its own
 * before (which cost 4-7 ms of a 256^3 Gaussian's ~45 ms on the 2-core VM): a NaN or an infinity
 * sets *seen, the planes not yet begun are skipped, and the kernel returns 1; the caller then takes
 * its missing-data path. Non-finite means exponent bits all ones; OR-ing integers vectorises. */
static inline uint32_t finite_bit(const float *x, int64_t i) {
    uint32_t u;
    memcpy(&u, x + i, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}

CLONES static int any_nonfinite(const float *x, int64_t n) {
    uint32_t any = 0;
    for (int64_t i = 0; i < n; i++) any |= finite_bit(x, i) ^ 1u;
    return any != 0;
}

static inline void watch(int *seen, const float *x, int64_t n) {
    if (seen && any_nonfinite(x, n)) {
#pragma omp atomic write
        *seen = 1;
    }
}

static inline int stop(int *seen) {
    int s;
#pragma omp atomic read
    s = *seen;
    return s;
}

/* What a kernel returns: -1 when a thread could not allocate its buffers, 1 when the input was not
 * all finite (the output is then incomplete), else 0. */
static int status(int failed, int seen) { return failed ? -1 : seen ? 1 : 0; }

/* GCC vector types: 8 floats (one AVX register, two SSE registers in the baseline clone); the
 * unaligned variant loads and stores anywhere. */
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
static inline v8 ld8(const float *p) { return *(const v8u *)p; }
static inline void st8(float *p, v8 v) { *(v8u *)p = v; }
/* st8 past the caches, p on 16 bytes (SSE's streaming store, in both clones); then fence() before
 * another thread reads what was stored. Elsewhere an ordinary store. */
#ifdef __SSE__
static inline void st8_stream(float *p, v8 v) {
    _mm_stream_ps(p, (__m128){v[0], v[1], v[2], v[3]});
    _mm_stream_ps(p + 4, (__m128){v[4], v[5], v[6], v[7]});
}
static inline void fence(void) { _mm_sfence(); }
#else
static inline void st8_stream(float *p, v8 v) { st8(p, v); }
static inline void fence(void) {}
#endif
static inline void put8(float *p, v8 v, int stream) {
    if (stream) st8_stream(p, v);
    else st8(p, v);
}

/* out[e] = sum_t w[t] * src[t][e] for e0 <= e < e1: the one operation of every separable pass (the
 * rows pass gives src[t] = padded row + t, the other passes the rows t - r away, border-mapped). The
 * accumulators stay in registers across taps (32 outputs at a time); a symmetric kernel (sym = 1 or
 * 2: w[r-d] == w[r+d], Gaussian and box) adds the two mirrored taps before one multiplication; sym = 2
 * says src[t] = src[0] + t, so the taps' addresses need no table loads (13% faster rows pass). Every element goes
 * through the same operations in the same order in the vector body and the scalar tail, so the
 * result does not depend on where the blocks fall. */
CLONES static void wsum(float *restrict out, const float *const *src, const float *w, int64_t T, int sym,
                        int64_t e0, int64_t e1) {
    int64_t r = (T - 1) / 2, e = e0;
    if (sym) {
        const float *c = src[r];
        const int shifts = sym == 2;  /* taps are src[0] + t (the rows pass): addresses without the table */
        for (; e + 32 <= e1; e += 32) {
            v8 a0 = w[r] * ld8(c + e), a1 = w[r] * ld8(c + e + 8), a2 = w[r] * ld8(c + e + 16), a3 = w[r] * ld8(c + e + 24);
            for (int64_t d = 1; d <= r; d++) {
                const float *p = shifts ? c + e + d : src[r + d] + e, *q = shifts ? c + e - d : src[r - d] + e;
                float wd = w[r + d];
                a0 += wd * (ld8(p) + ld8(q));
                a1 += wd * (ld8(p + 8) + ld8(q + 8));
                a2 += wd * (ld8(p + 16) + ld8(q + 16));
                a3 += wd * (ld8(p + 24) + ld8(q + 24));
            }
            st8(out + e, a0); st8(out + e + 8, a1); st8(out + e + 16, a2); st8(out + e + 24, a3);
        }
        for (; e + 8 <= e1; e += 8) {
            v8 a0 = w[r] * ld8(c + e);
            for (int64_t d = 1; d <= r; d++) a0 += w[r + d] * (ld8(src[r + d] + e) + ld8(src[r - d] + e));
            st8(out + e, a0);
        }
        for (; e < e1; e++) {
            float a0 = w[r] * c[e];
            for (int64_t d = 1; d <= r; d++) a0 += w[r + d] * (src[r + d][e] + src[r - d][e]);
            out[e] = a0;
        }
    } else {
        for (; e + 32 <= e1; e += 32) {
            const float *p = src[0] + e;
            v8 a0 = w[0] * ld8(p), a1 = w[0] * ld8(p + 8), a2 = w[0] * ld8(p + 16), a3 = w[0] * ld8(p + 24);
            for (int64_t t = 1; t < T; t++) {
                p = src[t] + e;
                a0 += w[t] * ld8(p); a1 += w[t] * ld8(p + 8); a2 += w[t] * ld8(p + 16); a3 += w[t] * ld8(p + 24);
            }
            st8(out + e, a0); st8(out + e + 8, a1); st8(out + e + 16, a2); st8(out + e + 24, a3);
        }
        for (; e + 8 <= e1; e += 8) {
            v8 a0 = w[0] * ld8(src[0] + e);
            for (int64_t t = 1; t < T; t++) a0 += w[t] * ld8(src[t] + e);
            st8(out + e, a0);
        }
        for (; e < e1; e++) {
            float a0 = w[0] * src[0][e];
            for (int64_t t = 1; t < T; t++) a0 += w[t] * src[t][e];
            out[e] = a0;
        }
    }
}

static int is_symmetric(const float *w, int64_t T) {
    for (int64_t t = 0; t < T / 2; t++)
        if (w[t] != w[T - 1 - t]) return 0;
    return 1;
}

/* rows[p] = row (p - r, border-mapped) of a stack of n rows `stride` floats apart, for p < n + 2r, so
 * that output row j reads its taps at rows + j; a zero row stands for the constant mode's outside. */
static void tap_table(const float **rows, const float *base, int64_t stride, int64_t n, int64_t r, int mode,
                      const float *zero) {
    for (int64_t p = 0; p < n + 2 * r; p++) {
        int64_t m = map_index(p - r, n, mode);
        rows[p] = m >= 0 ? base + m * stride : zero;
    }
}

/* Along the slow axis, symmetric kernels: 16 columns of two neighbouring output rows at a time
 * (rows + j + r holds the taps of output row j, centred). Rows j and j+1 share their taps, so each
 * step d loads two new rows (j-d, j+1+d) and reuses two from the step before: two loads, two
 * additions, two multiplications and two accumulations per 16 outputs and tap pair. Going down all
 * rows of one 16-column block keeps the 2r+2 rows it needs in L1. The arithmetic per element is
 * wsum's (w[r] x0, then + w[r+d] (x-d + x+d) for d = 1..r), so leftovers go through wsum. The two
 * rows a step first needs are asked for AHEAD rows early: the rows are a few KB apart, which the
 * hardware prefetchers do not follow (2-core VM, 256^3: Gaussian of 21 taps 9% faster with one
 * thread, 5% with two; 41 taps 12%; 3 and 9 taps unchanged; 8, 16 or 32 rows ahead alike).
 * With stream (and out on 16 bytes), the outputs go straight to memory (st8_stream): a plain store
 * first reads the line it writes into the cache, and the first sweep of a large volume never reads
 * its output back before it is evicted. Where the output is read again soon it costs: the separable
 * filter's k pass (it writes back lines it has just read) and the ring's output were 4-14% slower. */
#define AHEAD 16
/* What sym_cols asks for into L2 while it computes (NULL: nothing): n rows of `width` floats at
 * base, `stride` apart, a share of them after each 16-column block. */
struct ahead {
    const float *base;
    int64_t stride, n, width;
};
CLONES static void sym_cols(float *out, int64_t ostride, const float *const *rows, int64_t n, int64_t width,
                            const float *w, int64_t r, int stream, const struct ahead *next) {
    stream = stream && (uintptr_t)out % 16 == 0 && ostride % 4 == 0;
    const float wr = w[r];
    int64_t eb = width / 16 * 16, blocks = eb / 16 > 0 ? eb / 16 : 1;
    for (int64_t e = 0; e < eb; e += 16) {
        int64_t j = 0;
        for (; j + 2 <= n; j += 2) {
            const float *const *R = rows + j + r;
            if (j + AHEAD + 2 <= n) { __builtin_prefetch(R[r + AHEAD] + e); __builtin_prefetch(R[r + 1 + AHEAD] + e); }
            v8 la = ld8(R[0] + e), lb = ld8(R[0] + e + 8), ra = ld8(R[1] + e), rb = ld8(R[1] + e + 8);
            v8 s0a = wr * la, s0b = wr * lb, s1a = wr * ra, s1b = wr * rb;
            for (int64_t d = 1; d <= r; d++) {  /* here la/lb = row j+1-d, ra/rb = row j+d */
                const float wd = w[r + d];
                const v8 na = ld8(R[-d] + e), nb = ld8(R[-d] + e + 8);
                const v8 ma = ld8(R[1 + d] + e), mb = ld8(R[1 + d] + e + 8);
                s0a += wd * (na + ra);
                s0b += wd * (nb + rb);
                s1a += wd * (la + ma);
                s1b += wd * (lb + mb);
                la = na; lb = nb; ra = ma; rb = mb;
            }
            float *o = out + j * ostride + e;
            put8(o, s0a, stream); put8(o + 8, s0b, stream); put8(o + ostride, s1a, stream); put8(o + ostride + 8, s1b, stream);
        }
        if (j < n) wsum(out + j * ostride, rows + j, w, 2 * r + 1, 1, e, e + 16);
        if (next) {
            int64_t b = e / 16, p1 = (b + 1) * next->n / blocks;
            for (int64_t p = b * next->n / blocks; p < p1; p++)
                for (int64_t o = 0; o < next->width; o += 16) __builtin_prefetch(next->base + p * next->stride + o, 0, 2);
        }
    }
    if (eb < width)
        for (int64_t j = 0; j < n; j++) wsum(out + j * ostride, rows + j, w, 2 * r + 1, 1, eb, width);
}

/* One pass along the slow axis of a stack of rows: output row j (ostride apart) from rows + j, where
 * rows[p] is row p - r. Non-symmetric kernels go through wsum in strips of STRIP columns (the T rows
 * a strip needs stay in L1); only symmetric ones ask for `ask` meanwhile. */
#define STRIP 128
static void pass_cols(float *out, int64_t ostride, const float *const *rows, int64_t n, int64_t width,
                      const float *w, int64_t T, int sym, int stream, const struct ahead *ask) {
    if (sym) {
        sym_cols(out, ostride, rows, n, width, w, (T - 1) / 2, stream, ask);
        return;
    }
    for (int64_t e0 = 0; e0 < width; e0 += STRIP) {
        int64_t e1 = e0 + STRIP < width ? e0 + STRIP : width;
        for (int64_t j = 0; j < n; j++) wsum(out + j * ostride, rows + j, w, T, 0, e0, e1);
    }
}

/* One pass along the rows (the contiguous axis) of n rows of width nx, src rows nx apart, dst rows
 * dstride apart; edge is the rows' edge_table for r = (T - 1) / 2; pad (nx + T - 1 floats) and
 * taps (T pointers) are the calling thread's scratch. With seen, the rows are checked for NaN and
 * infinity as they are read (see watch). */
static void pass_rows(float *dst, int64_t dstride, const float *src, int64_t n, int64_t nx, const float *w,
                      int64_t T, int sym, const int64_t *edge, float *pad, const float **taps, int *seen) {
    for (int64_t t = 0; t < T; t++) taps[t] = pad + t;
    for (int64_t j = 0; j < n; j++) {
        pad_row(src + j * nx, pad, nx, (T - 1) / 2, edge);
        watch(seen, src + j * nx, nx);
        wsum(dst + j * dstride, taps, w, T, sym ? 2 : 0, 0, nx);
    }
}

/* Planes handed to a thread at a time by the per-plane loops: as many as fill 2 MB (8 planes of
 * 256x256), so that two threads seldom write into, and first touch, the same huge page of a fresh
 * output; at most an eighth of the volume, so that the threads still share the work evenly. Against
 * 2 planes at a time, 256^3, 2 threads, fresh 64-byte-aligned outputs, 21 alternated pairs, twice
 * (2-core VM): Gaussian of 21 taps paired ratios 0.94, 0.94; Sobel 0.91, 0.94; sharpen 0.83, 0.86;
 * 3x3x3 correlate 0.91, 0.94; 40 or 100 planes unchanged; same bits. */
static int64_t plane_chunk(int64_t nz, int64_t plane) {
    int64_t kc = HUGE_PAGE / (plane * (int64_t)sizeof(float));  /* plane >= 1: callers return on empty */
    if (kc > nz / 8) kc = nz / 8;
    return kc < 1 ? 1 : kc;
}

/* Row stride of a thread buffer: a multiple of 16 floats plus 16, so that rows a power of two
 * apart do not fall on the same L1 sets. */
static int64_t buffer_stride(int64_t n) { return (n + 15) / 16 * 16 + 16; }

/* n floats on a cache-line boundary (at least one line, so that n = 0 is not a failure). */
static float *alloc64(int64_t n) { return aligned_alloc(64, (size_t)(n > 16 ? (n * 4 + 63) / 64 * 64 : 64)); }

/* One sweep over memory for a short symmetric kernel along k: each thread takes a run of output
 * planes, smooths each input plane in-plane once into a ring of 2 rk + RING_G planes (its own
 * buffer, on 2 MB pages where the kernel allows: the ring's planes are read across many pages at
 * once), and then writes RING_G output planes at a time from the ring along k, so the input is read
 * once and the output written once. Worth it only while the ring stays in cache: on the 2-core
 * VM, 256^3, 2 threads, against the two sweeps of vf_separable: box of 3 32 -> 20 ms, Gaussian of
 * 7 taps 33 -> 24 ms, but 15 taps 38 -> 41 ms and 21 taps 45 -> 64 ms (rings of 4, 8, 16, 22
 * planes of 256 KB; the planes on 4 KB pages made the 21 taps slower still). Runs of RING_RUN
 * planes, handed out dynamically, so that a busy core does not hold the others up; the 2 rk
 * planes of halo are smoothed by both neighbouring runs. A volume under PARALLEL_MIN voxels stays
 * in cache in two sweeps too, and there the halo's extra in-plane work made it slower (64x64x40,
 * Gaussian of 21 taps: 0.85 -> 1.44 ms), so it keeps the two sweeps. */
#define RING_G 2
#define RING_MAX_BYTES (2 << 20)
#define RING_RUN 32

/* n floats on whole 2 MB pages where the kernel grants them (a hint; 4 KB pages give the same bits). */
static float *alloc_huge(int64_t n) {
    size_t huge = (size_t)HUGE_PAGE, nb = ((size_t)n * sizeof(float) + huge - 1) / huge * huge;
    void *p = NULL;
    if (posix_memalign(&p, huge, nb) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, nb, MADV_HUGEPAGE);
#endif
    return p;
}

static int ring_fits(int64_t plane, int64_t rk) { return (2 * rk + RING_G) * plane * (int64_t)sizeof(float) <= RING_MAX_BYTES; }

static int separable_ring(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                          const float *wk, int64_t Tk, const float *wj, int64_t Tj, const float *wi, int64_t Ti, int mode) {
    int failed = 0, seen = 0;
    int64_t plane = ny * nx, ri = (Ti - 1) / 2, rj = (Tj - 1) / 2, rk = (Tk - 1) / 2;
    int sj = is_symmetric(wj, Tj), si = is_symmetric(wi, Ti);
    int64_t R = 2 * rk + RING_G, ps = plane + 16;  /* ring planes a cache line apart in the cache sets */
    int64_t bs = buffer_stride(nx), zlen = plane > bs ? plane : bs;
    int64_t n_runs = (nz + RING_RUN - 1) / RING_RUN;
#pragma omp parallel  /* vf_separable sends only volumes of PARALLEL_MIN voxels or more */
    {
        float *ring = alloc_huge(R * ps);
        float *buf = alloc64(ny * bs), *pad = alloc64(nx + 2 * ri), *zero = alloc64(zlen);
        const float **src = malloc((size_t)Ti * sizeof(float *));
        const float **jrows = malloc((size_t)(ny + 2 * rj) * sizeof(float *));
        const float **krows = malloc((size_t)R * sizeof(float *));
        int64_t *edge = edge_table(nx, ri, mode);
        if (all_allocated(ring && buf && pad && zero && src && jrows && krows && edge, &failed)) {
            memset(zero, 0, (size_t)zlen * sizeof(float));
            tap_table(jrows, buf, bs, ny, rj, mode, zero);
#pragma omp for schedule(dynamic, 1)
            for (int64_t run = 0; run < n_runs; run++) {
                if (stop(&seen)) continue;
                int64_t k0 = run * RING_RUN, k1 = k0 + RING_RUN < nz ? k0 + RING_RUN : nz;
                int64_t next = k0 - rk;  /* the next input plane (before border mapping) to smooth */
                for (int64_t g0 = k0; g0 < k1; g0 += RING_G) {
                    int64_t g1 = g0 + RING_G < k1 ? g0 + RING_G : k1;
                    for (; next <= g1 - 1 + rk; next++) {
                        int64_t m = map_index(next, nz, mode);
                        if (m < 0) continue;  /* constant mode: the zero plane stands in */
                        pass_rows(buf, bs, x + m * plane, ny, nx, wi, Ti, si, edge, pad, src, &seen);
                        pass_cols(ring + ((next - (k0 - rk)) % R) * ps, nx, jrows, ny, nx, wj, Tj, sj, 0, NULL);
                    }
                    for (int64_t q = 0; q < g1 - g0 + 2 * rk; q++) {
                        int64_t p = g0 - rk + q;
                        krows[q] = map_index(p, nz, mode) < 0 ? zero : ring + ((p - (k0 - rk)) % R) * ps;
                    }
                    sym_cols(out + g0 * plane, plane, krows, g1 - g0, plane, wk, rk, 0, NULL);
                }
            }
        }
        free(ring); free(buf); free(pad); free(zero); free(src); free(jrows); free(krows); free(edge);
    }
    return status(failed, seen);
}

/* Separable correlation with one odd 1-D kernel per axis. A large volume with a short symmetric
 * kernel along k goes through separable_ring (one sweep); otherwise two sweeps over memory. First, per
 * plane: along the rows (i) into a plane buffer, then along the columns (j) into `out`; a 256x256
 * plane stays in L2. Then along k, in place on `out`, per chunk of the plane: the chunk's column
 * through all planes is copied to a thread buffer (KCHUNK_FLOATS, 128 KB) that serves all taps. A
 * thread takes KCHUNK_GROUP neighbouring chunks at a time and, while it computes one, asks for the
 * next into L2 (struct ahead), so that the copy finds it there; chunk, next chunk and the output
 * lines stay within a 512 KB L2. Against 1 MB chunks without it (the libraries called alternately
 * in one process, 2-core Zen 4 VM, same bits): Gaussian of 21 taps at 256^3 paired 0.92, 0.95 on
 * 2 threads, 0.94 on one; 176x240x256 0.92; 512x256x256 0.87; 13 taps 0.90; 41 taps 0.94. Asking
 * into L1 (prefetcht0) instead, or smaller chunks alone, did not change the time. The same way,
 * the columns pass of each plane asks for the next input plane, which the rows pass then reads:
 * 256^3, 21 taps, paired 0.935-0.95 on one thread (a workflow job's), 0.96-0.98 on two. The first sweep
 * streams its output past the caches in a volume of STREAM_MIN voxels or more (sym_cols): Gaussian
 * of 21 taps, 2-core VM, 2 threads, the two libraries called alternately in one process, output
 * buffers reused, paired ratios 0.90-0.92 at 256^3 (60 pairs), 0.87 at 64x256x256, 0.93 at
 * 32x256x256, 0.96 at 16x256x256; into new memory 1.0, where zeroing the new pages costs the time. */
#define KCHUNK_FLOATS 32768 /* floats of a k-pass chunk buffer, all planes together */
#define KCHUNK_GROUP 16
/* Columns of the k-pass chunk that starts at column c0 of a plane: cw, or what is left of it. */
static inline int64_t chunk_columns(int64_t c0, int64_t cw, int64_t plane) { return plane - c0 < cw ? plane - c0 : cw; }
int vf_separable(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                 const float *wk, int64_t Tk, const float *wj, int64_t Tj, const float *wi, int64_t Ti, int mode) {
    if (nz <= 0 || ny <= 0 || nx <= 0) return 0;  /* nothing to filter (map_index needs n >= 1) */
    int failed = 0, seen = 0;
    int64_t plane = ny * nx, ri = (Ti - 1) / 2, rj = (Tj - 1) / 2, rk = (Tk - 1) / 2, kc = plane_chunk(nz, plane);
    int sk = is_symmetric(wk, Tk), sj = is_symmetric(wj, Tj), si = is_symmetric(wi, Ti);
    if (sk && nz * plane >= PARALLEL_MIN && ring_fits(plane, rk))
        return separable_ring(x, out, nz, ny, nx, wk, Tk, wj, Tj, wi, Ti, mode);
    int64_t cw = (KCHUNK_FLOATS / nz) / 32 * 32;
    if (cw < 32) cw = 32;
    if (cw > plane) cw = plane;
    int64_t n_chunks = (plane + cw - 1) / cw, n_groups = (n_chunks + KCHUNK_GROUP - 1) / KCHUNK_GROUP;
    const int stream = nz * plane >= STREAM_MIN;  /* the first sweep's output, past the caches */
    int64_t bs = buffer_stride(nx), cs = buffer_stride(cw), zlen = bs > cs ? bs : cs;
#pragma omp parallel if (nz * ny * nx >= PARALLEL_MIN)
    {
        float *buf = alloc64(ny * bs), *pad = alloc64(nx + 2 * ri), *col = alloc64(nz * cs), *zero = alloc64(zlen);
        const float **src = malloc((size_t)Ti * sizeof(float *));
        const float **jrows = malloc((size_t)(ny + 2 * rj) * sizeof(float *));
        const float **krows = malloc((size_t)(nz + 2 * rk) * sizeof(float *));
        int64_t *edge = edge_table(nx, ri, mode);
        if (all_allocated(buf && pad && col && zero && src && jrows && krows && edge, &failed)) {
            memset(zero, 0, (size_t)zlen * sizeof(float));
            tap_table(jrows, buf, bs, ny, rj, mode, zero);
            tap_table(krows, col, cs, nz, rk, mode, zero);
#pragma omp for schedule(dynamic, kc)
            for (int64_t k = 0; k < nz; k++) {
                if (stop(&seen)) continue;
                pass_rows(buf, bs, x + k * plane, ny, nx, wi, Ti, si, edge, pad, src, &seen);
                struct ahead next_plane = {x + (k + 1) * plane, nx, ny, nx};  /* for the rows pass */
                pass_cols(out + k * plane, nx, jrows, ny, nx, wj, Tj, sj, stream, k + 1 < nz ? &next_plane : NULL);
                if (stream) fence();  /* the streamed planes are read by any thread after the barrier */
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < n_groups; g++) {
                int64_t c1 = (g + 1) * KCHUNK_GROUP < n_chunks ? (g + 1) * KCHUNK_GROUP : n_chunks;
                for (int64_t c = g * KCHUNK_GROUP; c < c1 && !stop(&seen); c++) {
                    int64_t c0 = c * cw, n = chunk_columns(c0, cw, plane);
                    for (int64_t k = 0; k < nz; k++) memcpy(col + k * cs, out + k * plane + c0, (size_t)n * sizeof(float));
                    struct ahead next = {NULL, plane, nz, 0}, *ask = NULL;
                    if (c + 1 < c1) {  /* the next chunk of this thread's group */
                        next.base = out + c0 + cw;
                        next.width = chunk_columns(c0 + cw, cw, plane);
                        ask = &next;
                    }
                    pass_cols(out + c0, plane, krows, nz, n, wk, Tk, sk, 0, ask);
                }
            }
        }
        free(buf); free(pad); free(col); free(zero); free(src); free(jrows); free(krows); free(edge);
    }
    return status(failed, seen);
}

/* Sobel/Prewitt per plane. which: 0, 1, 2 = derivative along view axis k, j, i; 3 = magnitude.
 * The k pass is done while reading the three planes (P smoothed, Q differenced along k); the in-plane
 * passes are the separable filter's (pass_rows, pass_cols). */
int vf_gradient(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                const float *smooth, const float *scale, int which, int mode) {
    if (nz <= 0 || ny <= 0 || nx <= 0) return 0;  /* nothing to filter (map_index needs n >= 1) */
    int failed = 0, seen = 0;
    int64_t plane = ny * nx, kc = plane_chunk(nz, plane);
    const float d[3] = {-1.0f, 0.0f, 1.0f};
    const int ss = is_symmetric(smooth, 3);
#pragma omp parallel if (nz * ny * nx >= PARALLEL_MIN)
    {
        float *P = malloc((size_t)plane * sizeof(float)), *Q = malloc((size_t)plane * sizeof(float));
        float *t1 = malloc((size_t)plane * sizeof(float)), *gk = malloc((size_t)plane * sizeof(float));
        float *gj = malloc((size_t)plane * sizeof(float)), *gi = malloc((size_t)plane * sizeof(float));
        float *pad = malloc((size_t)(nx + 2) * sizeof(float)), *zero = calloc((size_t)nx, sizeof(float));
        const float **taps = malloc(3 * sizeof(float *)), **rows = malloc((size_t)(ny + 2) * sizeof(float *));
        int64_t *edge = edge_table(nx, 1, mode);
        if (all_allocated(P && Q && t1 && gk && gj && gi && pad && zero && taps && rows && edge, &failed)) {
            tap_table(rows, t1, nx, ny, 1, mode, zero);
#pragma omp for schedule(dynamic, kc)
            for (int64_t k = 0; k < nz; k++) {
                if (stop(&seen)) continue;
                int64_t km = map_index(k - 1, nz, mode), kp = map_index(k + 1, nz, mode);
                const float *c = x + k * plane;
                const float *a = km >= 0 ? x + km * plane : NULL, *b = kp >= 0 ? x + kp * plane : NULL;
                watch(&seen, c, plane);
                for (int64_t n = 0; n < plane; n++) {
                    float av = a ? a[n] : 0.0f, bv = b ? b[n] : 0.0f;
                    P[n] = smooth[0] * av + smooth[1] * c[n] + smooth[2] * bv;
                    Q[n] = bv - av;
                }
                if (which == 0 || which == 3) {
                    pass_rows(t1, nx, Q, ny, nx, smooth, 3, ss, edge, pad, taps, NULL);
                    pass_cols(gk, nx, rows, ny, nx, smooth, 3, ss, 0, NULL);
                }
                if (which == 1 || which == 3) {
                    pass_rows(t1, nx, P, ny, nx, smooth, 3, ss, edge, pad, taps, NULL);
                    pass_cols(gj, nx, rows, ny, nx, d, 3, 0, 0, NULL);
                }
                if (which == 2 || which == 3) {
                    pass_rows(t1, nx, P, ny, nx, d, 3, 0, edge, pad, taps, NULL);
                    pass_cols(gi, nx, rows, ny, nx, smooth, 3, ss, 0, NULL);
                }
                float *o = out + k * plane;
                for (int64_t n = 0; n < plane; n++) {
                    if (which == 3) {
                        float u = gk[n] * scale[0], v = gj[n] * scale[1], w = gi[n] * scale[2];
                        o[n] = sqrtf(u * u + v * v + w * w);
                    } else if (which == 0) o[n] = gk[n] * scale[0];
                    else if (which == 1) o[n] = gj[n] * scale[1];
                    else o[n] = gi[n] * scale[2];
                }
            }
        }
        free(P); free(Q); free(t1); free(gk); free(gj); free(gi); free(pad); free(zero); free(taps); free(rows);
        free(edge);
    }
    return status(failed, seen);
}

/* (1 + 6a) x - a (sum of the 6 face neighbours), one pass. */
int vf_sharpen(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx, float amount, int mode) {
    if (nz <= 0 || ny <= 0 || nx <= 0) return 0;  /* nothing to filter (map_index needs n >= 1) */
    int failed = 0, seen = 0;
    int64_t kc = plane_chunk(nz, ny * nx);
    const float centre = 1.0f + 6.0f * amount, a = amount;
#pragma omp parallel if (nz * ny * nx >= PARALLEL_MIN)
    {
        float *pad = malloc((size_t)(nx + 2) * sizeof(float));
        int64_t *edge = edge_table(nx, 1, mode);
        if (all_allocated(pad && edge, &failed))
#pragma omp for schedule(dynamic, kc)
        for (int64_t k = 0; k < nz; k++) {
            if (stop(&seen)) continue;
            watch(&seen, x + k * ny * nx, ny * nx);
            int64_t km = map_index(k - 1, nz, mode), kp = map_index(k + 1, nz, mode);
            for (int64_t j = 0; j < ny; j++) {
                int64_t jm = map_index(j - 1, ny, mode), jp = map_index(j + 1, ny, mode);
                const float *c = x + (k * ny + j) * nx;
                float *o = out + (k * ny + j) * nx;
                pad_row(c, pad, nx, 1, edge);
                for (int64_t i = 0; i < nx; i++) o[i] = pad[i] + pad[i + 2];
                if (km >= 0) axpy(o, x + (km * ny + j) * nx, 1.0f, nx);
                if (kp >= 0) axpy(o, x + (kp * ny + j) * nx, 1.0f, nx);
                if (jm >= 0) axpy(o, x + (k * ny + jm) * nx, 1.0f, nx);
                if (jp >= 0) axpy(o, x + (k * ny + jp) * nx, 1.0f, nx);
                for (int64_t i = 0; i < nx; i++) o[i] = centre * c[i] - a * o[i];
            }
        }
        free(pad); free(edge);
    }
    return status(failed, seen);
}

/* Direct 3-D correlation with an odd kernel w (kz, ky, kx), C order. */
int vf_correlate(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                 const float *w, int64_t kz, int64_t ky, int64_t kx, int mode) {
    if (nz <= 0 || ny <= 0 || nx <= 0) return 0;  /* nothing to filter (map_index needs n >= 1) */
    int failed = 0, seen = 0;
    int64_t kc = plane_chunk(nz, ny * nx);
    int64_t rk = kz / 2, rj = ky / 2, ri = kx / 2;
#pragma omp parallel if (nz * ny * nx >= PARALLEL_MIN)
    {
        float *pad = malloc((size_t)(nx + 2 * ri) * sizeof(float));
        int64_t *edge = edge_table(nx, ri, mode);
        if (all_allocated(pad && edge, &failed))
#pragma omp for schedule(dynamic, kc)
        for (int64_t k = 0; k < nz; k++) {
            if (stop(&seen)) continue;
            watch(&seen, x + k * ny * nx, ny * nx);
            for (int64_t j = 0; j < ny; j++) {
                float *o = out + (k * ny + j) * nx;
                memset(o, 0, (size_t)nx * sizeof(float));
                for (int64_t dk = 0; dk < kz; dk++) {
                    int64_t mk = map_index(k + dk - rk, nz, mode);
                    if (mk < 0) continue;
                    for (int64_t dj = 0; dj < ky; dj++) {
                        int64_t mj = map_index(j + dj - rj, ny, mode);
                        if (mj < 0) continue;
                        pad_row(x + (mk * ny + mj) * nx, pad, nx, ri, edge);
                        for (int64_t di = 0; di < kx; di++) {
                            float wt = w[(dk * ky + dj) * kx + di];
                            if (wt != 0.0f) axpy(o, pad + di, wt, nx);
                        }
                    }
                }
            }
        }
        free(pad); free(edge);
    }
    return status(failed, seen);
}

/* 1 when no element of x is NaN or infinite (exponent bits all ones), without a mask array. */
int vf_all_finite(const float *x, int64_t n) {
    int64_t bad = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : bad) if (n >= 4 * PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += BLOCK) bad += any_nonfinite(x + b, b + BLOCK < n ? BLOCK : n - b);
    return bad == 0;
}

/* Sums for Forman's smoothness estimate of one volume over its valid voxels (finite, and mask != 0
 * where mask is given): out[0] = their number, out[1] = the sum of their squared deviations from
 * their mean, out[2 + a] = the sum of squared first differences along view axis a (0 = k, 1 = j,
 * 2 = i) over pairs of valid neighbours, out[5 + a] = the number of those pairs.
 * Accumulated in double: voxels i = 1 + 4q + l of a plane's rows (l = 0..3) in running sum l, the
 * others (i = 0 and a row's last nx - 1 mod 4) in a fifth; the five are added in a fixed order at
 * the end of each plane, and the planes in order. So the bits do not depend on the thread count
 * or the CPU, and the loop vectorises without branches: four voxels at a time, invalid ones
 * masked to +0 (bench/NOTES.md, fourteenth session). */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));

/* The helpers below carry their callers' NO_TRAP: GCC does not inline across different optimize
 * attributes, and out of line they would pass 32-byte vectors between clones of two ABIs. */
NO_TRAP static inline v4d load4d(const float *p) {
    v4f f;
    memcpy(&f, p, sizeof f);
    return (v4d){f[0], f[1], f[2], f[3]};
}

/* 32-bit lanes to 64-bit ones, -1 staying -1 (__builtin_convertvector needs GCC 9; RHEL 8 has 8). */
NO_TRAP static inline v4l widen(v4i m) { return (v4l){m[0], m[1], m[2], m[3]}; }

/* -1 where voxel i..i+3 of r is finite and its mask byte is not 0, else 0. */
NO_TRAP static inline v4l valid4(const float *r, const uint8_t *m, int64_t i) {
    v4i u, mm = {m[i], m[i + 1], m[i + 2], m[i + 3]};
    memcpy(&u, r + i, sizeof u);
    return widen(((u & 0x7f800000) != 0x7f800000) & (mm != 0));
}

/* 1 where voxel i of r is finite and its mask byte is not 0, else 0: valid4 for one voxel. */
NO_TRAP static inline uint32_t valid1(const float *r, const uint8_t *m, int64_t i) { return finite_bit(r, i) & (m[i] != 0); }

NO_TRAP static inline v4d keep(v4l ok, v4d v) { return (v4d)((v4l)v & ok); }

NO_TRAP static inline double sum4(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

NO_TRAP static inline double pick(uint32_t ok, double v) { return ok ? v : 0.0; }

/* The first pass over one plane: out[0] = the number of valid voxels, out[1] = their sum. */
NO_TRAP CLONES static void count_plane(const float *x, const uint8_t *m, int64_t ny, int64_t nx, double *out) {
    v4d n4 = {0, 0, 0, 0}, s4 = n4;
    const v4d one = {1, 1, 1, 1};
    double n1 = 0, s1 = 0;
    for (int64_t j = 0; j < ny; j++) {
        const float *r = x + j * nx;
        const uint8_t *mr = m + j * nx;
        int64_t i = 1;
        for (; i + 4 <= nx; i += 4) {
            const v4l ok = valid4(r, mr, i);
            n4 += keep(ok, one);
            s4 += keep(ok, load4d(r + i));
        }
        for (int64_t t = 0; t < nx; t = t == 0 ? i : t + 1) {  /* i = 0, then the row's tail */
            const uint32_t ok = valid1(r, mr, t);
            n1 += pick(ok, 1.0);
            s1 += pick(ok, r[t]);
        }
    }
    out[0] = sum4(n4) + n1;
    out[1] = sum4(s4) + s1;
}

/* The second pass over one plane: the 8 sums of vf_fwhm_sums. xk, mk: the plane before (hk = 1),
 * or any valid plane (hk = 0). */
NO_TRAP CLONES static void fwhm_plane(const float *x, const uint8_t *m, const float *xk, const uint8_t *mk,
                                      uint32_t hk, int64_t ny, int64_t nx, double mean, double *out) {
    v4d a[8];
    double b[8] = {0};
    for (int q = 0; q < 8; q++) a[q] = (v4d){0, 0, 0, 0};
    const v4d one = {1, 1, 1, 1}, mean4 = {mean, mean, mean, mean};
    const v4l khas = {-(int64_t)hk, -(int64_t)hk, -(int64_t)hk, -(int64_t)hk};
    for (int64_t j = 0; j < ny; j++) {
        const float *r = x + j * nx, *rj = j > 0 ? r - nx : r, *rk = xk + j * nx;
        const uint8_t *mr = m + j * nx, *mj = j > 0 ? mr - nx : mr, *mkr = mk + j * nx;
        const int64_t hj = j > 0;
        const v4l jhas = {-hj, -hj, -hj, -hj};
        int64_t i = 1;
        for (; i + 4 <= nx; i += 4) {
            const v4l ok = valid4(r, mr, i);
            const v4l okk = ok & khas & valid4(rk, mkr, i), okj = ok & jhas & valid4(rj, mj, i);
            const v4l oki = ok & valid4(r, mr, i - 1);
            const v4d v = load4d(r + i), dev = v - mean4;
            const v4d dk = v - load4d(rk + i), dj = v - load4d(rj + i), di = v - load4d(r + i - 1);
            a[0] += keep(ok, one);
            a[1] += keep(ok, dev * dev);
            a[2] += keep(okk, dk * dk);
            a[3] += keep(okj, dj * dj);
            a[4] += keep(oki, di * di);
            a[5] += keep(okk, one);
            a[6] += keep(okj, one);
            a[7] += keep(oki, one);
        }
        for (int64_t t = 0; t < nx; t = t == 0 ? i : t + 1) {  /* i = 0, then the row's tail */
            const uint32_t ok = valid1(r, mr, t);
            const int64_t tb = t > 0 ? t - 1 : t;
            const uint32_t okk = ok & hk & valid1(rk, mkr, t);
            const uint32_t okj = ok & (uint32_t)hj & valid1(rj, mj, t);
            const uint32_t oki = ok & (t > 0) & valid1(r, mr, tb);
            const double v = r[t], dev = v - mean, dk = v - (double)rk[t], dj = v - (double)rj[t], di = v - (double)r[tb];
            b[0] += pick(ok, 1.0);
            b[1] += pick(ok, dev * dev);
            b[2] += pick(okk, dk * dk);
            b[3] += pick(okj, dj * dj);
            b[4] += pick(oki, di * di);
            b[5] += pick(okk, 1.0);
            b[6] += pick(okj, 1.0);
            b[7] += pick(oki, 1.0);
        }
    }
    for (int q = 0; q < 8; q++) out[q] = sum4(a[q]) + b[q];
}

int vf_fwhm_sums(const float *x, const uint8_t *mask, int64_t nz, int64_t ny, int64_t nx, double *out) {
    const int64_t plane = ny * nx;
    double *part = calloc((size_t)(nz > 0 ? nz : 1) * 8, sizeof(double));
    uint8_t *ones = mask ? NULL : malloc((size_t)(plane > 0 ? plane : 1));
    if (!part || (!mask && !ones)) { free(part); free(ones); return -1; }
    if (ones) memset(ones, 1, (size_t)plane);
#define MASK_OF(k) (mask ? mask + (k) * plane : ones)
#pragma omp parallel for schedule(dynamic, 2) if (nz * plane >= PARALLEL_MIN)
    for (int64_t k = 0; k < nz; k++) count_plane(x + k * plane, MASK_OF(k), ny, nx, part + k * 8);
    double n = 0, s = 0;
    for (int64_t k = 0; k < nz; k++) { n += part[k * 8]; s += part[k * 8 + 1]; }
    const double mean = n > 0 ? s / n : 0.0;
#pragma omp parallel for schedule(dynamic, 2) if (nz * plane >= PARALLEL_MIN)
    for (int64_t k = 0; k < nz; k++)
        fwhm_plane(x + k * plane, MASK_OF(k), x + (k > 0 ? k - 1 : k) * plane, MASK_OF(k > 0 ? k - 1 : k), k > 0,
                   ny, nx, mean, part + k * 8);
#undef MASK_OF
    for (int q = 0; q < 8; q++) out[q] = 0;
    out[0] = n;
    for (int64_t k = 0; k < nz; k++)
        for (int q = 1; q < 8; q++) out[q] += part[k * 8 + q];
    free(part);
    free(ones);
    return 0;
}

/* Intensity statistics of n voxels for QC, over the finite ones: out[0] = their number, out[1] =
 * the number of NaN voxels, out[2], out[3] = their min and max, out[4] = their mean, out[5] = the
 * sum of their squared deviations from it (two passes: no cancellation for MRI's large means).
 * Sums in double, in four running sums per block of BLOCK voxels (voxel i in sum i mod 4, a block's
 * last n mod 4 in a fifth), the blocks added in order: the same bits for any thread count or CPU.
 * In place of NumPy slab by slab (pipeline/qc.py): 256^3 80-90 ms there, 22 ms here on one thread, 12 ms on two. */
typedef float v4fu __attribute__((vector_size(16), aligned(4)));

NO_TRAP CLONES static void stats_block(const float *x, int64_t n, int second, double mean, double *out) {
    v4d cnt = {0, 0, 0, 0}, nan4 = cnt, sum = cnt;
    const v4d one = {1, 1, 1, 1}, mean4 = {mean, mean, mean, mean};
    v4f lo = {INFINITY, INFINITY, INFINITY, INFINITY}, hi = -lo;
    double c1 = 0, nan1 = 0, s1 = 0;
    float lo1 = INFINITY, hi1 = -INFINITY;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        v4i u;
        memcpy(&u, x + i, sizeof u);
        const v4f v = *(const v4fu *)(x + i);
        const v4i fin = (u & 0x7f800000) != 0x7f800000;
        const v4l fin64 = widen(fin);
        if (second) {
            const v4d dev = load4d(x + i) - mean4;
            sum += keep(fin64, dev * dev);
            continue;
        }
        cnt += keep(fin64, one);
        nan4 += keep(widen((u & 0x7fffffff) > 0x7f800000), one);
        sum += keep(fin64, load4d(x + i));
        const v4i below = fin & (v < lo), above = fin & (v > hi);
        lo = (v4f)(((v4i)v & below) | ((v4i)lo & ~below));
        hi = (v4f)(((v4i)v & above) | ((v4i)hi & ~above));
    }
    for (; i < n; i++) {
        const uint32_t ok = finite_bit(x, i);
        const float v = x[i];
        if (second) {
            const double dev = (double)v - mean;
            s1 += pick(ok, dev * dev);
            continue;
        }
        c1 += pick(ok, 1.0);
        nan1 += pick(isnan(v), 1.0);
        s1 += pick(ok, v);
        lo1 = ok && v < lo1 ? v : lo1;
        hi1 = ok && v > hi1 ? v : hi1;
    }
    if (second) {
        out[5] = sum4(sum) + s1;
        return;
    }
    for (int l = 0; l < 4; l++) {
        lo1 = lo[l] < lo1 ? lo[l] : lo1;
        hi1 = hi[l] > hi1 ? hi[l] : hi1;
    }
    out[0] = sum4(cnt) + c1;
    out[1] = sum4(nan4) + nan1;
    out[2] = lo1;
    out[3] = hi1;
    out[4] = sum4(sum) + s1;
}

int vf_finite_stats(const float *x, int64_t n, double *out) {
    const int64_t nb = n > 0 ? (n + BLOCK - 1) / BLOCK : 1;
    double *part = calloc((size_t)nb * 6, sizeof(double));
    if (!part) return -1;
    for (int pass = 0; pass < 2; pass++) {
        const double mean = pass ? (out[0] > 0 ? out[4] / out[0] : 0.0) : 0.0;
#pragma omp parallel for schedule(dynamic, 16) if (n >= PARALLEL_MIN)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t start = b * BLOCK, len = start + BLOCK < n ? BLOCK : n - start;
            stats_block(x + start, len > 0 ? len : 0, pass, mean, part + b * 6);
        }
        if (pass == 0) {
            out[0] = out[1] = out[4] = 0;
            out[2] = INFINITY;
            out[3] = -INFINITY;
            for (int64_t b = 0; b < nb; b++) {
                const double *q = part + b * 6;
                out[0] += q[0];
                out[1] += q[1];
                out[4] += q[4];
                out[2] = q[2] < out[2] ? q[2] : out[2];
                out[3] = q[3] > out[3] ? q[3] : out[3];
            }
        } else {
            out[4] = out[0] > 0 ? out[4] / out[0] : NAN;
            out[5] = 0;
            for (int64_t b = 0; b < nb; b++) out[5] += part[b * 6 + 5];
        }
    }
    free(part);
    return 0;
}

/* counts[b] = how many x fall in [edges[b], edges[b+1]) (the last bin closed), NaN, Inf and values
 * outside [edges[0], edges[nbins]] left out: np.histogram's rule for given edges. The bin is
 * guessed from the equal spacing and then checked against the edges themselves. Integer counts:
 * the same whatever the thread count. */
int vf_histogram(const float *x, int64_t n, const double *edges, int64_t nbins, int64_t *counts) {
    const double lo = edges[0], hi = edges[nbins], scale = (double)nbins / (hi - lo);
    int failed = 0;
    memset(counts, 0, (size_t)nbins * sizeof(int64_t));
#pragma omp parallel if (n >= PARALLEL_MIN)
    {
        int64_t *local = calloc((size_t)nbins, sizeof(int64_t));
        if (all_allocated(local != NULL, &failed)) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < n; i++) {
                const double v = x[i];
                if (!(v >= lo && v <= hi)) continue;
                int64_t b = (int64_t)((v - lo) * scale);
                if (b > nbins - 1) b = nbins - 1;
                if (b < 0) b = 0;
                while (b > 0 && v < edges[b]) b--;
                while (b < nbins - 1 && v >= edges[b + 1]) b++;
                local[b]++;
            }
#pragma omp critical
            for (int64_t b = 0; b < nbins; b++) counts[b] += local[b];
        }
        free(local);
    }
    return failed ? -1 : 0;
}

/* Missing data (pipeline/filters.py: filter_volume), each step one pass over memory, in place of
 * NumPy's several passes with a full-size temporary each: on the 2-core VM a 256^3 volume with a
 * brain-shaped mask took 163 ms (Gaussian) and 267 ms (sharpen) against 49 and 18 ms without.
 * Blocks of BLOCK voxels are handed out dynamically; every voxel is computed alone, so the results
 * are those of the NumPy forms, bit for bit. Arrays are flat runs of n voxels in one memory order. */
/* The per-block loops are written without branches and compiled NO_TRAP, so that they vectorise:
 * with branches a ring of the fill took 2.9 ns per voxel on a 64x64x40 EPI volume in cache. */
NO_TRAP CLONES static int64_t prepare_block(const float *x, const uint8_t *mask, float *w, float *filled, int64_t n) {
    int32_t c = 0;  /* n <= BLOCK */
    for (int64_t i = 0; i < n; i++) {
        int32_t m = mask ? (int32_t)mask[i] : 1;  /* this form vectorises with and without a mask */
        int32_t v = finite_bit(x, i) & (m != 0);
        w[i] = v ? 1.0f : 0.0f;
        filled[i] = v ? x[i] : 0.0f;
        c += v;
    }
    return c;
}

NO_TRAP CLONES static int64_t fill_block(float *filled, float *w, const float *count, const float *total, int64_t n) {
    int32_t c = 0;  /* n <= BLOCK */
    for (int64_t i = 0; i < n; i++) {
        float q = total[i] / count[i];  /* also where unused: 0/0 is a quiet NaN, never kept */
        int32_t g = (w[i] == 0.0f) & (count[i] > 0.0f);
        filled[i] = g ? q : filled[i];
        w[i] = g ? 1.0f : w[i];
        c += g;
    }
    return c;
}

NO_TRAP CLONES static void finish_block(float *out, const float *den, const float *x, const uint8_t *mask, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = den ? out[i] / den[i] : out[i];
        v = finite_bit(x, i) ? v : NAN;
        int32_t m = mask ? (int32_t)mask[i] : 1;
        out[i] = m != 0 ? v : 0.0f;
    }
}

/* valid = x finite and (no mask, or mask != 0); w = valid ? 1 : 0; filled = valid ? x : 0.
 * Returns the number of valid voxels. */
int64_t vf_missing_prepare(const float *x, const uint8_t *mask, float *w, float *filled, int64_t n) {
    int64_t count = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : count) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t m = b + BLOCK < n ? BLOCK : n - b;
        count += prepare_block(x + b, mask ? mask + b : NULL, w + b, filled + b, m);
    }
    return count;
}

/* One ring of the fill: where w == 0 and count > 0, filled = total / count and w = 1 (count and
 * total are box means of w and filled). Returns how many voxels it filled. */
int64_t vf_fill_ring(float *filled, float *w, const float *count, const float *total, int64_t n) {
    int64_t grown = 0;
#pragma omp parallel for schedule(dynamic, 16) reduction(+ : grown) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t m = b + BLOCK < n ? BLOCK : n - b;
        grown += fill_block(filled + b, w + b, count + b, total + b, m);
    }
    return grown;
}

/* The last step: out = out / den (when den is given), then NaN where x is not finite, then 0
 * outside the mask (when given). */
void vf_missing_finish(float *out, const float *den, const float *x, const uint8_t *mask, int64_t n) {
#pragma omp parallel for schedule(dynamic, 16) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n; b += BLOCK) {
        int64_t m = b + BLOCK < n ? BLOCK : n - b;
        finish_block(out + b, den ? den + b : NULL, x + b, mask ? mask + b : NULL, m);
    }
}

/* out = a x + b y, 2 MB of output to a thread at a time (see plane_chunk; against 256 KB: 256^3
 * into fresh outputs, 2 threads, 21 alternated pairs, three times: paired ratios 0.90-0.99) */
void vf_axpby(const float *x, const float *y, float *out, int64_t n, float a, float b) {
#pragma omp parallel for schedule(dynamic, HUGE_PAGE / (int64_t)sizeof(float)) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i++) out[i] = a * x[i] + b * y[i];
}

/* The SHA-256 of the source this library was built from (setup.py defines it; "" when built by
 * hand): pipeline/native.py does not use a library built from another version of this file. */
#ifndef VF_SOURCE_SHA256
#define VF_SOURCE_SHA256 ""
#endif
const char *vf_source_sha256(void) { return VF_SOURCE_SHA256; }

void vf_set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

/* Volumes under this many voxels run on the calling thread (see PARALLEL_MIN). */
int64_t vf_parallel_min(void) { return PARALLEL_MIN; }

int vf_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* A Python module only so that setuptools builds and places this library; it is used via ctypes. */
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "volfilter native kernels (ctypes)", -1, NULL};
PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
