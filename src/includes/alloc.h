/* The core's one allocator for big tables (LPM arrays, NAT tables).
 *
 * A block of EGC_BIG_MIN bytes or more is an anonymous mmap without
 * reservation: zeroed, and its pages are supplied by the kernel on first
 * touch, so a table sized for a gateway costs no time and no resident memory
 * until it is used.  `huge` advises transparent huge pages (from 2 MiB up):
 * the tables are probed at random, so TLB misses would otherwise double the
 * cost of each lookup once they are large and busy.  This kernel aligns an
 * anonymous mapping to 2 MiB only when its length is a multiple of 2 MiB,
 * so other blocks get huge pages in their aligned middle only (smaps);
 * rounding them up was tried and did not pay (the 100,000-flow datapath
 * A/B, 2026-12-03).  A smaller block comes zeroed from calloc.
 * Returns NULL on failure; free with egc_free_big(p, the same size). */
#ifndef EGC_ALLOC_H
#define EGC_ALLOC_H

#include <stdlib.h>
#include <sys/mman.h>

#define EGC_BIG_MIN ((size_t)1 << 16)
#define EGC_HUGE_MIN ((size_t)1 << 21)

static inline void *egc_alloc_big(size_t size, int huge)
{
    void *p;
    if (size < EGC_BIG_MIN)
        return calloc(1, size ? size : 1);
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    if (huge && size >= EGC_HUGE_MIN)
        madvise(p, size, MADV_HUGEPAGE);
#endif
    return p;
}

static inline void egc_free_big(void *p, size_t size)
{
    if (p == NULL)
        return;
    if (size < EGC_BIG_MIN)
        free(p);
    else
        munmap(p, size);
}

#endif /* EGC_ALLOC_H */
