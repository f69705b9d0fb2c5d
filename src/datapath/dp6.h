/* datapath/dp6.h: small IPv6 helpers of the IPv6 datapath stages
 * (datapath/v6.pyx): LPM of a 16-byte address, 16-byte compares.  Their
 * egress map lookup is lpm_egress.h's egress_map_lookup6p_in.  Both run
 * inside the batch's read section (datapath/stages.pyx dp_read_begin). */
#ifndef EGRESSCORE_DP6_H
#define EGRESSCORE_DP6_H

#include <stdint.h>
#include "lpm/lpm_egress.h"

/* Longest-prefix match of a 16-byte network-order IPv6 address in trie t
 * (LPM_NONE when t is NULL or nothing matches), inside the batch's read
 * section: no atomic operation here. */
static inline uint32_t dp_lpm6(lpm_trie *t, const uint8_t *a16)
{
    if (t == NULL)
        return LPM_NONE;
    LPM_RCU_ASSERT_READING();
    return lpm6_table_lookup(lpm_trie_table(t), be_load64(a16), be_load64(a16 + 8));
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
