/* datapath/podmac.h: a local pod's MAC (learned from its frames, or set) as
 * one 64-bit word, bit 48 set when known (0: unknown), read and written
 * whole.  The workers of one agent (Agent(workers=N)) share one table of
 * them (Datapath.share_pod_macs): a reply steered to another worker than
 * the one that saw the pod's frame is delivered with the MAC that one
 * learned, and no reader ever sees half of a MAC being replaced. */
#ifndef EGRESSCORE_PODMAC_H
#define EGRESSCORE_PODMAC_H

#include <stdint.h>

static inline uint64_t dp_podmac_word(const uint8_t *m)
{
    return (1ULL << 48) | ((uint64_t)m[0] << 40) | ((uint64_t)m[1] << 32) | ((uint64_t)m[2] << 24)
           | ((uint64_t)m[3] << 16) | ((uint64_t)m[4] << 8) | (uint64_t)m[5];
}

static inline uint64_t dp_podmac_load(const uint64_t *cell)
{
    return __atomic_load_n(cell, __ATOMIC_RELAXED);
}

/* Learn: written only when it changed (readers on other cores keep their cache line). */
static inline void dp_podmac_learn(uint64_t *cell, const uint8_t *m)
{
    uint64_t w = dp_podmac_word(m);
    if (__atomic_load_n(cell, __ATOMIC_RELAXED) != w)
        __atomic_store_n(cell, w, __ATOMIC_RELAXED);
}

static inline void dp_podmac_store(uint64_t *cell, uint64_t w)
{
    __atomic_store_n(cell, w, __ATOMIC_RELAXED);
}

/* The 6 bytes of a known word w at dst. */
static inline void dp_podmac_put(uint8_t *dst, uint64_t w)
{
    for (int i = 0; i < 6; i++)
        dst[i] = (uint8_t)(w >> (40 - 8 * i));
}

#endif
