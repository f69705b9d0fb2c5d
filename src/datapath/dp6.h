/* datapath/dp6.h: the IPv6 egress map lookup as the IPv6 datapath stages
 * (datapath/v6.pyx) need it: one call under the map's read section that
 * also gives the entry's policy id and its gateway split in two words.
 *
 * Returns an EGRESS_* status; egress16 (16 bytes, network order), g_hi,
 * g_lo and policy are set unless EGRESS_NO_MATCH.  An entry's gateway is
 * the gateway node's IPv4 underlay address as ::ffff:a.b.c.d (the compiler
 * keeps the four addresses of an entry in one family): g_hi == 0 and
 * g_lo >> 32 == 0xffff. */
#ifndef EGRESSCORE_DP6_H
#define EGRESSCORE_DP6_H

#include <stdint.h>
#include "lpm/lpm_egress.h"

static inline int dp_egress_lookup6p(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                                     uint8_t *egress16, uint64_t *g_hi, uint64_t *g_lo,
                                     uint32_t *policy)
{
    egress_val6 v;
    unsigned idx = lpm_rcu_enter(&m->rcu);
    int r = egress_snap_lookup6(egress_map_snap(m, 1), be_load64(src16), be_load64(src16 + 8),
                                be_load64(dst16), be_load64(dst16 + 8), &v);
    lpm_rcu_exit(&m->rcu, idx);
    if (r != EGRESS_NO_MATCH) {
        be_store64(egress16, v.e_hi);
        be_store64(egress16 + 8, v.e_lo);
        *g_hi = v.g_hi;
        *g_lo = v.g_lo;
        *policy = v.policy;
    }
    return r;
}

/* Longest-prefix match of a 16-byte network-order IPv6 address in trie t
 * (LPM_NONE when t is NULL or nothing matches). */
static inline uint32_t dp_lpm6(lpm_trie *t, const uint8_t *a16)
{
    if (t == NULL)
        return LPM_NONE;
    unsigned idx = lpm_rcu_enter(&t->rcu);
    uint32_t v = lpm6_table_lookup(lpm_trie_table(t), be_load64(a16), be_load64(a16 + 8));
    lpm_rcu_exit(&t->rcu, idx);
    return v;
}

/* 16-byte address compare (1: equal). */
static inline int dp_eq16(const uint8_t *a, const uint8_t *b)
{
    return be_load64(a) == be_load64(b) && be_load64(a + 8) == be_load64(b + 8);
}

static inline int dp_zero16(const uint8_t *a)
{
    return (be_load64(a) | be_load64(a + 8)) == 0;
}

#endif
