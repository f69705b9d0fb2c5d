/* Small C helpers for the NAT table (src/nat.pyx): hashing, prefetch,
 * bit scans (tables come from includes/alloc.h).  Everything is static inline
 * so it folds into the one translation unit of egresscore._core. */
#ifndef EGRESSCORE_NAT_HELPERS_H
#define EGRESSCORE_NAT_HELPERS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NAT_NONE 0xffffffffu
#define NAT_PF_SLOT 16
#define NAT_PF_ENTRY 8
/* the reply batch (nat_reverse_batch): farther ahead, for tables in DRAM */
#define NAT_RPF_SLOT 32
#define NAT_RPF_ENTRY 16
#define NAT_RPF_RING 64
#define NAT_WHEEL_UNSET UINT64_MAX

/* wyhash-style 64x64->128 multiply folded to 64 bits: fast, well mixed. */
static inline uint64_t nat_mum(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

#define NAT_P0 0xa0761d6478bd642fULL
#define NAT_P1 0xe7037ed1a0b428dbULL
#define NAT_P2 0x8ebc6af09c88c6e3ULL
#define NAT_P3 0x589965cc75374cc3ULL

/* Hash of 3 or 5 little words (first word carries family/proto/ports). */
static inline uint64_t nat_hash3(uint64_t seed, uint64_t w0, uint64_t w1, uint64_t w2)
{
    uint64_t h = nat_mum(w0 ^ seed ^ NAT_P0, w1 ^ NAT_P1);
    return nat_mum(h ^ w2 ^ NAT_P2, NAT_P3 ^ 3);
}

static inline uint64_t nat_hash5(uint64_t seed, uint64_t w0, uint64_t w1, uint64_t w2,
                                 uint64_t w3, uint64_t w4)
{
    uint64_t h = nat_mum(w0 ^ seed ^ NAT_P0, w1 ^ NAT_P1);
    h = nat_mum(h ^ w2 ^ NAT_P2, w3 ^ NAT_P3);
    return nat_mum(h ^ w4 ^ NAT_P1, NAT_P3 ^ 5);
}

/* Unaligned 8-byte load (addresses live at any offset in packet structs). */
static inline uint64_t nat_load64(const void *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline int nat_eq16(const void *a, const void *b)
{
    return nat_load64(a) == nat_load64(b) &&
           nat_load64((const char *)a + 8) == nat_load64((const char *)b + 8);
}

/* Prefetch the line of p (for a write: the same on x86-64, where the
 * builtin gives prefetcht0 without -mprfchw).  As asm on x86-64: GCC 12
 * dropped the builtin from loops it inlined it into (the datapath's batch
 * loop lost every entry prefetch, seen in objdump). */
static inline void nat_prefetch(const void *p)
{
#if defined(__x86_64__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

static inline void nat_prefetch_w(const void *p)
{
#if defined(__x86_64__)
    nat_prefetch(p);
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

static inline int nat_ctz64(uint64_t x) { return __builtin_ctzll(x); }

#endif
