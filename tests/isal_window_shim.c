/* LD_PRELOAD shim for tests/test_io.py: each malloc of the size of python-isal's _ParallelCompress
 * object (its struct isal_zstream is ~82 KB) gets memory just below one of six 64 KiB windows of
 * the address space, so that the struct lands inside that window. In each of them ISA-L's level-1
 * deflate (2.32.1) encodes a stream that starts without a dictionary otherwise (found by
 * bench/isal_repro.c's scan). Everything else is left to the C library. */
#define _GNU_SOURCE
#include <stddef.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);

static const unsigned long windows[] = {0x49d0d0f60000UL, 0x6ba0be0d0000UL, 0x4970f5d60000UL,
                                        0x3be06a960000UL, 0x54603c200000UL, 0x2160b26a0000UL};
#define N_WINDOWS (sizeof windows / sizeof windows[0])
#define SPAN 0x30000UL
static char *placed[N_WINDOWS];
static size_t taken;

void *malloc(size_t n) {
    if (n >= 82000 && n <= 83500 && taken < N_WINDOWS) {
        char *at = (char *)(windows[taken] - 0x10000UL);
        void *m = mmap(at, SPAN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
        if (m == MAP_FAILED || m != (void *)at) return __libc_malloc(n);
        placed[taken++] = m;
        return (char *)m + 0xfff0; /* the object starts 16 bytes below the window, its struct inside */
    }
    return __libc_malloc(n);
}

void free(void *p) {
    for (size_t i = 0; i < taken; i++)
        if ((char *)p >= placed[i] && (char *)p < placed[i] + SPAN) return;
    __libc_free(p);
}
