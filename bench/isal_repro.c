/* Reproduces the rare gzip-byte difference (README, "Failure behaviour") deterministically: ISA-L's
 * level-1 deflate (isal_deflate, SYNC_FLUSH, empty dictionary, as isal's _ParallelCompress calls
 * it) encodes the same input otherwise when the struct isal_zstream lies in certain 64 KiB windows
 * of the address space. Both encodings are valid deflate of the same bytes. What decides is the
 * struct's own address, bits 16-46 (every placement inside such a window, none outside it): not
 * its contents (zero, 0xAB or 0xFF fill alike), nor the addresses of the input, the output, the
 * level buffer or the library, nor AVX-512 (the same under valgrind, whose CPU has AVX2 only; no
 * memcheck error). In a process, python-isal allocates the struct inside each _ParallelCompress
 * object, so where the heap lands (ASLR) decides: about one process in five thousand.
 *
 * The cause: in igzip_icf_body_h1_gr_bt.asm (the level-1 body, all of its SSE/AVX/AVX2 variants;
 * the C base variant does not do it), a stream without history goes through .write_first_byte,
 * which hashes the third byte from tmp2 (rcx), a register that still holds the stream pointer
 * there, so position 2 lands in a hash slot given by address bits 16 and up. pipeline/io.py now
 * starts every stream with a stored block of 16 bytes and passes them to ISA-L as its dictionary,
 * so that path is never taken; that procedure, run over the same 39,981 random windows as the scan
 * below (8 windows changed some input), changed none.
 *
 *   apt-get install libisal-dev   # the headers only (struct isal_zstream)
 *   gcc -O2 bench/isal_repro.c -o /tmp/isal_repro -ldl
 *   python -c "import gzip,sys; sys.stdout.buffer.write(gzip.decompress(open('OUT.nii.gz','rb').read()))" > /tmp/payload.bin
 *   /tmp/isal_repro LIBPYTHON ISAL_ZLIB_SO 0x49d0d0f60000 /tmp/payload.bin ...   # one window, several inputs
 *   /tmp/isal_repro LIBPYTHON ISAL_ZLIB_SO scan:40000 /tmp/payload.bin ...       # random windows
 *
 * LIBPYTHON: the libpython3.x.so that isal's extension needs; ISAL_ZLIB_SO: isal's isal_zlib*.so,
 * which exports the bundled isal_* functions (python-isal 1.9.1: ISA-L 2.32.1). With that build,
 * a 4,192-byte NIfTI output of the test suite deflates to 3,187 bytes, and to 3,186 with the
 * struct at 0x49d0d0f60000-0x49d0d0f6ffff. A window is compared against the struct at a malloc'd
 * address; a scan prints each window where some input encodes otherwise, one flag per input. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <isa-l/igzip_lib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define WINDOW (1UL << 16)
static void (*init)(struct isal_zstream *), (*reset)(struct isal_zstream *);
static int (*set_dict)(struct isal_zstream *, uint8_t *, uint32_t), (*deflate)(struct isal_zstream *);
static uint8_t out[1 << 22], *level_buf;

/* FNV-1a of the deflated bytes, mixed with their length */
static unsigned long deflate_at(struct isal_zstream *s, uint8_t *in, size_t n) {
    init(s);
    s->level_buf_size = ISAL_DEF_LVL1_DEFAULT;
    s->level_buf = level_buf;
    s->gzip_flag = IGZIP_GZIP_NO_HDR;
    s->hist_bits = ISAL_DEF_MAX_HIST_BITS;
    s->level = 1;
    s->flush = SYNC_FLUSH;
    reset(s);
    s->next_in = in;
    s->avail_in = (uint32_t)n;
    s->next_out = out;
    s->avail_out = sizeof out;
    set_dict(s, (uint8_t *)"", 0);
    deflate(s);
    unsigned long len = (unsigned long)(s->next_out - out), h = 1469598103934665603UL;
    for (unsigned long i = 0; i < len; i++) h = (h ^ out[i]) * 1099511628211UL;
    return (h << 24) ^ len;
}

static struct isal_zstream *map_window(uintptr_t at) {
    void *m = mmap((void *)at, 2 * WINDOW, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    return m == MAP_FAILED || (uintptr_t)m != at ? NULL : (struct isal_zstream *)m;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s LIBPYTHON ISAL_ZLIB_SO ADDRESS|scan:N PAYLOAD...\n", argv[0]);
        return 2;
    }
    dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
    void *h = dlopen(argv[2], RTLD_LAZY | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "%s\n", dlerror());
        return 2;
    }
    init = (void (*)(struct isal_zstream *))dlsym(h, "isal_deflate_init");
    reset = (void (*)(struct isal_zstream *))dlsym(h, "isal_deflate_reset");
    set_dict = (int (*)(struct isal_zstream *, uint8_t *, uint32_t))dlsym(h, "isal_deflate_set_dict");
    deflate = (int (*)(struct isal_zstream *))dlsym(h, "isal_deflate");
    level_buf = malloc(ISAL_DEF_LVL1_DEFAULT);
    int n_in = argc - 4;
    uint8_t **in = calloc(n_in, sizeof *in);
    size_t *len = calloc(n_in, sizeof *len);
    unsigned long *ref = calloc(n_in, sizeof *ref);
    struct isal_zstream *usual = malloc(sizeof *usual);
    for (int p = 0; p < n_in; p++) {
        FILE *f = fopen(argv[4 + p], "rb");
        if (!f) return 2;
        in[p] = malloc(1 << 22);
        len[p] = fread(in[p], 1, 1 << 22, f);
        fclose(f);
        ref[p] = deflate_at(usual, in[p], len[p]);
    }
    if (strncmp(argv[3], "scan:", 5) != 0) {
        struct isal_zstream *s = map_window(strtoul(argv[3], NULL, 0) & ~(WINDOW - 1));
        if (!s) return 2;
        for (int p = 0; p < n_in; p++)
            printf("%s: %lu bytes at %p, %lu at %p\n", argv[4 + p], ref[p] & 0xFFFFFF, (void *)usual,
                   deflate_at(s, in[p], len[p]) & 0xFFFFFF, (void *)s);
        return 0;
    }
    long tries = atol(argv[3] + 5), made = 0, found = 0;
    srand(7);
    for (long t = 0; t < tries; t++) {
        uintptr_t at = ((((uintptr_t)rand() << 31) ^ (uintptr_t)rand()) << 16) & 0x00007ff0ffff0000UL;
        struct isal_zstream *s = at >= (1UL << 32) ? map_window(at) : NULL;
        if (!s) continue;
        made++;
        char flags[64] = {0};
        int any = 0;
        for (int p = 0; p < n_in && p < 63; p++) {
            int differs = deflate_at(s, in[p], len[p]) != ref[p];
            flags[p] = differs ? 'X' : '.';
            any |= differs;
        }
        if (any) printf("%p %s\n", (void *)s, flags), found++;
        munmap(s, 2 * WINDOW);
    }
    printf("%ld of %ld windows encode some input otherwise\n", found, made);
    return 0;
}
