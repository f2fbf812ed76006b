/* Reproduces the rare gzip-byte difference (README, "Failure behaviour"): the same 4,192-byte NIfTI
 * payload deflated by ISA-L at level 1 (SYNC_FLUSH, empty dictionary, after one small warm-up call,
 * as isal's _ParallelCompress does for pipeline.io's first block) gives 3,187 bytes, but 3,186 in
 * 4 and 6 of 20,000 fresh processes (two runs) with python-isal 1.9.1's bundled ISA-L 2.32.1; none
 * in 20,000 with address-space randomisation off (setarch -R), none in 20,000 with Debian's
 * libisal 2.30, and none in 10,000 with 1 MB / 2 MB buffers instead of these 64 KB / 1 MB ones (so
 * where the buffers lie matters).
 *
 *   apt-get install libisal-dev   # the headers only (struct isal_zstream)
 *   gcc -O2 bench/isal_repro.c -o /tmp/isal_repro -ldl
 *   python -c "import gzip,sys; sys.stdout.buffer.write(gzip.decompress(open('OUT.nii.gz','rb').read()))" > /tmp/payload.bin
 *   for i in $(seq 20000); do /tmp/isal_repro /tmp/payload.bin LIBPYTHON ISAL_ZLIB_SO; done | sort | uniq -c
 *
 * LIBPYTHON: the libpython3.x.so the extension needs (its Python symbols); ISAL_ZLIB_SO: isal's
 * isal_zlib*.so, which exports the bundled isal_* functions; "-" for both uses the linked libisal
 * instead (then build with -DLINKED_ISAL ... -lisal). */
#include <dlfcn.h>
#include <isa-l/igzip_lib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s PAYLOAD LIBPYTHON ISAL_ZLIB_SO\n", argv[0]);
        return 2;
    }
    void (*init)(struct isal_zstream *), (*reset)(struct isal_zstream *);
    int (*set_dict)(struct isal_zstream *, uint8_t *, uint32_t), (*deflate)(struct isal_zstream *);
    if (strcmp(argv[3], "-") != 0) {
        dlopen(argv[2], RTLD_NOW | RTLD_GLOBAL);
        void *h = dlopen(argv[3], RTLD_LAZY | RTLD_LOCAL);
        if (!h) {
            fprintf(stderr, "%s\n", dlerror());
            return 2;
        }
        init = (void (*)(struct isal_zstream *))dlsym(h, "isal_deflate_init");
        reset = (void (*)(struct isal_zstream *))dlsym(h, "isal_deflate_reset");
        set_dict = (int (*)(struct isal_zstream *, uint8_t *, uint32_t))dlsym(h, "isal_deflate_set_dict");
        deflate = (int (*)(struct isal_zstream *))dlsym(h, "isal_deflate");
    } else {
#ifdef LINKED_ISAL
        init = isal_deflate_init; reset = isal_deflate_reset; set_dict = isal_deflate_set_dict; deflate = isal_deflate;
#else
        fprintf(stderr, "build with -DLINKED_ISAL -lisal to use the linked library\n");
        return 2;
#endif
    }
    static uint8_t in[1 << 16], out[1 << 20];
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    size_t n = fread(in, 1, sizeof in, f);
    fclose(f);
    struct isal_zstream s;
    init(&s);
    s.level_buf_size = ISAL_DEF_LVL1_DEFAULT;
    s.level_buf = malloc(s.level_buf_size);
    s.gzip_flag = IGZIP_GZIP_NO_HDR;
    s.hist_bits = ISAL_DEF_MAX_HIST_BITS;
    s.level = 1;
    s.flush = SYNC_FLUSH;
    for (int pass = 0; pass < 2; pass++) {  /* the warm-up, then the payload */
        reset(&s);
        s.next_in = pass ? in : (uint8_t *)"volfilter";
        s.avail_in = pass ? (uint32_t)n : 9;
        s.next_out = out;
        s.avail_out = sizeof out;
        set_dict(&s, (uint8_t *)"", 0);
        int err = deflate(&s);
        if (pass) printf("err %d, %ld bytes\n", err, (long)(s.next_out - out));
    }
    return 0;
}
