/* volfilter's fused, multithreaded CPU kernels (OpenMP), loaded with ctypes by pipeline/native.py.
 *
 * Arrays are C-ordered float32 volumes (nz, ny, nx); x is the contiguous axis. Border modes follow
 * scipy.ndimage: 0 reflect, 1 mirror, 2 nearest, 3 wrap, 4 constant (zero). Every output voxel is
 * computed by one thread in a fixed order, and the build forbids fused multiply-add contraction
 * (-ffp-contract=off), so the bits do not depend on the thread count or the CPU's vector width.
 * Hot loops are compiled twice (AVX2 and baseline x86-64) and chosen at load time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

static inline int64_t map_index(int64_t idx, int64_t n, int mode) {
    if (idx >= 0 && idx < n) return idx;
    if (mode == 4) return -1;
    if (mode == 2) return idx < 0 ? 0 : n - 1;
    if (mode == 3) { int64_t m = idx % n; return m < 0 ? m + n : m; }
    if (mode == 0) { int64_t p = 2 * n, m = idx % p; if (m < 0) m += p; return m < n ? m : p - m - 1; }
    if (n == 1) return 0;
    { int64_t p = 2 * n - 2, m = idx % p; if (m < 0) m += p; return m < n ? m : p - m; }
}

static void pad_row(const float *row, float *pad, int64_t n, int64_t r, int mode) {
    memcpy(pad + r, row, (size_t)n * sizeof(float));
    for (int64_t p = 0; p < r; p++) {
        int64_t m = map_index(p - r, n, mode);
        pad[p] = m >= 0 ? row[m] : 0.0f;
        m = map_index(n + p, n, mode);
        pad[r + n + p] = m >= 0 ? row[m] : 0.0f;
    }
}

CLONES static void axpy(float *restrict out, const float *restrict s, float w, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] += w * s[i];
}

/* dst[j, :] = sum_t w[t] * pad(src[j, :])[i + t] : correlation along the contiguous axis of a plane */
static void corr_rows(const float *src, float *dst, int64_t ny, int64_t nx, const float *w, int64_t T, int mode, float *pad) {
    int64_t r = (T - 1) / 2;
    for (int64_t j = 0; j < ny; j++) {
        float *o = dst + j * nx;
        pad_row(src + j * nx, pad, nx, r, mode);
        memset(o, 0, (size_t)nx * sizeof(float));
        for (int64_t t = 0; t < T; t++) axpy(o, pad + t, w[t], nx);
    }
}

/* dst[j, :] = sum_t w[t] * src[map(j + t - r), :] : correlation along the first axis of a plane */
static void corr_cols(const float *src, float *dst, int64_t ny, int64_t nx, const float *w, int64_t T, int mode) {
    int64_t r = (T - 1) / 2;
    for (int64_t j = 0; j < ny; j++) {
        float *o = dst + j * nx;
        memset(o, 0, (size_t)nx * sizeof(float));
        for (int64_t t = 0; t < T; t++) {
            int64_t m = map_index(j + t - r, ny, mode);
            if (m >= 0) axpy(o, src + m * nx, w[t], nx);
        }
    }
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

/* Separable correlation, all three passes per output plane: along k into a plane buffer, then rows, then columns. */
int vf_separable(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                 const float *wk, int64_t Tk, const float *wj, int64_t Tj, const float *wi, int64_t Ti, int mode) {
    int failed = 0;
    int64_t rk = (Tk - 1) / 2, plane = ny * nx;
#pragma omp parallel
    {
        float *buf = malloc((size_t)plane * sizeof(float));
        float *buf2 = malloc((size_t)plane * sizeof(float));
        float *pad = malloc((size_t)(nx + Ti) * sizeof(float));
        if (all_allocated(buf && buf2 && pad, &failed))
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nz; k++) {
            for (int64_t j = 0; j < ny; j++) {
                float *acc = buf + j * nx;
                memset(acc, 0, (size_t)nx * sizeof(float));
                for (int64_t t = 0; t < Tk; t++) {
                    int64_t m = map_index(k + t - rk, nz, mode);
                    if (m >= 0) axpy(acc, x + (m * ny + j) * nx, wk[t], nx);
                }
            }
            corr_rows(buf, buf2, ny, nx, wi, Ti, mode, pad);
            corr_cols(buf2, out + k * plane, ny, nx, wj, Tj, mode);
        }
        free(buf); free(buf2); free(pad);
    }
    return failed ? -1 : 0;
}

/* Sobel/Prewitt per plane. which: 0, 1, 2 = derivative along view axis k, j, i; 3 = magnitude. */
int vf_gradient(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                const float *smooth, const float *scale, int which, int mode) {
    int failed = 0;
    int64_t plane = ny * nx;
    const float d[3] = {-1.0f, 0.0f, 1.0f};
#pragma omp parallel
    {
        float *P = malloc((size_t)plane * sizeof(float)), *Q = malloc((size_t)plane * sizeof(float));
        float *t1 = malloc((size_t)plane * sizeof(float)), *gk = malloc((size_t)plane * sizeof(float));
        float *gj = malloc((size_t)plane * sizeof(float)), *gi = malloc((size_t)plane * sizeof(float));
        float *pad = malloc((size_t)(nx + 3) * sizeof(float));
        if (all_allocated(P && Q && t1 && gk && gj && gi && pad, &failed))
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nz; k++) {
            int64_t km = map_index(k - 1, nz, mode), kp = map_index(k + 1, nz, mode);
            const float *c = x + k * plane;
            const float *a = km >= 0 ? x + km * plane : NULL, *b = kp >= 0 ? x + kp * plane : NULL;
            for (int64_t n = 0; n < plane; n++) {
                float av = a ? a[n] : 0.0f, bv = b ? b[n] : 0.0f;
                P[n] = smooth[0] * av + smooth[1] * c[n] + smooth[2] * bv;
                Q[n] = bv - av;
            }
            if (which == 0 || which == 3) { corr_rows(Q, t1, ny, nx, smooth, 3, mode, pad); corr_cols(t1, gk, ny, nx, smooth, 3, mode); }
            if (which == 1 || which == 3) { corr_rows(P, t1, ny, nx, smooth, 3, mode, pad); corr_cols(t1, gj, ny, nx, d, 3, mode); }
            if (which == 2 || which == 3) { corr_rows(P, t1, ny, nx, d, 3, mode, pad); corr_cols(t1, gi, ny, nx, smooth, 3, mode); }
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
        free(P); free(Q); free(t1); free(gk); free(gj); free(gi); free(pad);
    }
    return failed ? -1 : 0;
}

/* (1 + 6a) x - a (sum of the 6 face neighbours), one pass. */
int vf_sharpen(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx, float amount, int mode) {
    int failed = 0;
    const float centre = 1.0f + 6.0f * amount, a = amount;
#pragma omp parallel
    {
        float *pad = malloc((size_t)(nx + 2) * sizeof(float));
        if (all_allocated(pad != NULL, &failed))
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nz; k++) {
            int64_t km = map_index(k - 1, nz, mode), kp = map_index(k + 1, nz, mode);
            for (int64_t j = 0; j < ny; j++) {
                int64_t jm = map_index(j - 1, ny, mode), jp = map_index(j + 1, ny, mode);
                const float *c = x + (k * ny + j) * nx;
                float *o = out + (k * ny + j) * nx;
                pad_row(c, pad, nx, 1, mode);
                for (int64_t i = 0; i < nx; i++) o[i] = pad[i] + pad[i + 2];
                if (km >= 0) axpy(o, x + (km * ny + j) * nx, 1.0f, nx);
                if (kp >= 0) axpy(o, x + (kp * ny + j) * nx, 1.0f, nx);
                if (jm >= 0) axpy(o, x + (k * ny + jm) * nx, 1.0f, nx);
                if (jp >= 0) axpy(o, x + (k * ny + jp) * nx, 1.0f, nx);
                for (int64_t i = 0; i < nx; i++) o[i] = centre * c[i] - a * o[i];
            }
        }
        free(pad);
    }
    return failed ? -1 : 0;
}

/* Direct 3-D correlation with an odd kernel w (kz, ky, kx), C order. */
int vf_correlate(const float *x, float *out, int64_t nz, int64_t ny, int64_t nx,
                 const float *w, int64_t kz, int64_t ky, int64_t kx, int mode) {
    int failed = 0;
    int64_t rk = kz / 2, rj = ky / 2, ri = kx / 2;
#pragma omp parallel
    {
        float *pad = malloc((size_t)(nx + 2 * ri) * sizeof(float));
        if (all_allocated(pad != NULL, &failed))
#pragma omp for schedule(static)
        for (int64_t k = 0; k < nz; k++) {
            for (int64_t j = 0; j < ny; j++) {
                float *o = out + (k * ny + j) * nx;
                memset(o, 0, (size_t)nx * sizeof(float));
                for (int64_t dk = 0; dk < kz; dk++) {
                    int64_t mk = map_index(k + dk - rk, nz, mode);
                    if (mk < 0) continue;
                    for (int64_t dj = 0; dj < ky; dj++) {
                        int64_t mj = map_index(j + dj - rj, ny, mode);
                        if (mj < 0) continue;
                        pad_row(x + (mk * ny + mj) * nx, pad, nx, ri, mode);
                        for (int64_t di = 0; di < kx; di++) {
                            float wt = w[(dk * ky + dj) * kx + di];
                            if (wt != 0.0f) axpy(o, pad + di, wt, nx);
                        }
                    }
                }
            }
        }
        free(pad);
    }
    return failed ? -1 : 0;
}

/* out = a x + b y */
void vf_axpby(const float *x, const float *y, float *out, int64_t n, float a, float b) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = a * x[i] + b * y[i];
}

void vf_set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
}

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
