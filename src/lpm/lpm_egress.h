/* egresscore egress policy map: exact source -> per-source destination LPM.
 *
 * A snapshot is an open-addressing hash table (linear probing, load <= 1/2)
 * from source IP to an immutable lpm_table over destination prefixes whose
 * leaf values index the table's aux array of (egress IP, gateway IP, policy
 * id: the compiler's small number for the policy that wrote the entry, 0 for
 * none, which the datapath's per-policy counters are indexed by).
 * Updates build a new snapshot (sharing the unchanged per-source tables),
 * publish it with one atomic store and free what it replaced after an
 * lpm_rcu_sync grace period.
 */
#ifndef EGRESSCORE_LPM_EGRESS_H
#define EGRESSCORE_LPM_EGRESS_H

#include "lpm_core.h"

/* Lookup status, shared with the Python surface (EGRESS_* constants). */
#define EGRESS_NO_MATCH 0     /* no policy: default path (masquerade) */
#define EGRESS_MATCH 1        /* redirect to the gateway, SNAT to egress IP */
#define EGRESS_EXCLUDED 2     /* excluded CIDR (gateway 0.0.0.1 / ::1): default path */
#define EGRESS_NO_GATEWAY 3   /* policy matched, gateway 0.0.0.0 / ::: drop */

/* The gateway sentinels as stored (egresscore/types.py's strings, as numbers). */
#define EGRESS_GW_NOT_FOUND 0 /* GatewayNotFoundIPv4 0.0.0.0 / :: */
#define EGRESS_GW_EXCLUDED 1  /* ExcludedCIDRIPv4 0.0.0.1 / ::1 */

typedef struct {
    uint64_t hi, lo;        /* IPv4: hi = host-order source, lo = 0 */
    lpm_table *tbl;         /* NULL: empty slot */
} egress_slot;

typedef struct {
    uint32_t bits;          /* capacity 1 << bits */
    uint32_t n;
    egress_slot *slots;
} egress_snap;

typedef struct { uint32_t egress, gateway, policy; } egress_val4;
typedef struct { uint64_t e_hi, e_lo, g_hi, g_lo; uint32_t policy, _pad; } egress_val6;

typedef struct {
    lpm_rcu rcu;
    egress_snap *snap[2];   /* [0] IPv4, [1] IPv6 */
} egress_map;

static inline uint32_t egress_hash(uint64_t hi, uint64_t lo, unsigned bits) {
    uint64_t x = (hi ^ (lo * 0xC2B2AE3D27D4EB4FULL)) * 0x9E3779B97F4A7C15ULL;
    return (uint32_t)(x >> (64 - bits));
}

static inline const egress_slot *egress_snap_find(const egress_snap *s, uint64_t hi, uint64_t lo) {
    if (!s || !s->n) return NULL;
    uint32_t mask = (1u << s->bits) - 1;
    uint32_t h = egress_hash(hi, lo, s->bits);
    for (;;) {
        const egress_slot *sl = &s->slots[h];
        if (!sl->tbl) return NULL;
        if (sl->hi == hi && sl->lo == lo) return sl;
        h = (h + 1) & mask;
    }
}

/* Returns an EGRESS_* status; egress/gateway/policy are set unless EGRESS_NO_MATCH. */
static inline int egress_snap_lookup4p(const egress_snap *s, uint32_t src, uint32_t dst,
                                       uint32_t *egress, uint32_t *gateway, uint32_t *policy) {
    const egress_slot *sl = egress_snap_find(s, src, 0);
    if (!sl) return EGRESS_NO_MATCH;
    uint32_t v = lpm4_table_lookup(sl->tbl, dst);
    if (v == LPM_NONE) return EGRESS_NO_MATCH;
    const egress_val4 *val = (const egress_val4 *)sl->tbl->aux + v;
    *egress = val->egress;
    *gateway = val->gateway;
    *policy = val->policy;
    if (val->gateway == EGRESS_GW_NOT_FOUND) return EGRESS_NO_GATEWAY;
    if (val->gateway == EGRESS_GW_EXCLUDED) return EGRESS_EXCLUDED;
    return EGRESS_MATCH;
}

static inline int egress_snap_lookup4(const egress_snap *s, uint32_t src, uint32_t dst,
                                      uint32_t *egress, uint32_t *gateway) {
    uint32_t policy;
    return egress_snap_lookup4p(s, src, dst, egress, gateway, &policy);
}

static inline int egress_snap_lookup6(const egress_snap *s, uint64_t src_hi, uint64_t src_lo,
                                      uint64_t dst_hi, uint64_t dst_lo, egress_val6 *out) {
    const egress_slot *sl = egress_snap_find(s, src_hi, src_lo);
    if (!sl) return EGRESS_NO_MATCH;
    uint32_t v = lpm6_table_lookup(sl->tbl, dst_hi, dst_lo);
    if (v == LPM_NONE) return EGRESS_NO_MATCH;
    *out = ((const egress_val6 *)sl->tbl->aux)[v];
    if (out->g_hi == 0 && out->g_lo == EGRESS_GW_NOT_FOUND) return EGRESS_NO_GATEWAY;
    if (out->g_hi == 0 && out->g_lo == EGRESS_GW_EXCLUDED) return EGRESS_EXCLUDED;
    return EGRESS_MATCH;
}

static inline const egress_snap *egress_map_snap(egress_map *m, int v6) {
    return __atomic_load_n(&m->snap[v6], __ATOMIC_ACQUIRE);
}

/* egress_map_lookup4 that also gives the entry's policy id (0: none). */
static inline int egress_map_lookup4p(egress_map *m, uint32_t src, uint32_t dst,
                                      uint32_t *egress, uint32_t *gateway, uint32_t *policy) {
    unsigned idx = lpm_rcu_enter(&m->rcu);
    int r = egress_snap_lookup4p(egress_map_snap(m, 0), src, dst, egress, gateway, policy);
    lpm_rcu_exit(&m->rcu, idx);
    return r;
}

static inline int egress_map_lookup4(egress_map *m, uint32_t src, uint32_t dst,
                                     uint32_t *egress, uint32_t *gateway) {
    uint32_t policy;
    return egress_map_lookup4p(m, src, dst, egress, gateway, &policy);
}

static inline int egress_map_lookup6(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                                     uint8_t *egress16, uint8_t *gateway16) {
    egress_val6 v;
    unsigned idx = lpm_rcu_enter(&m->rcu);
    int r = egress_snap_lookup6(egress_map_snap(m, 1), be_load64(src16), be_load64(src16 + 8),
                                be_load64(dst16), be_load64(dst16 + 8), &v);
    lpm_rcu_exit(&m->rcu, idx);
    if (r != EGRESS_NO_MATCH) {
        be_store64(egress16, v.e_hi);
        be_store64(egress16 + 8, v.e_lo);
        be_store64(gateway16, v.g_hi);
        be_store64(gateway16 + 8, v.g_lo);
    }
    return r;
}

/* policy (or NULL) receives each entry's policy id, 0 where status is EGRESS_NO_MATCH. */
static void egress_map_lookup4_batch(egress_map *m, const uint32_t *src, const uint32_t *dst, size_t n,
                                     uint32_t *egress, uint32_t *gateway, uint8_t *status, uint32_t *policy) {
    unsigned idx = lpm_rcu_enter(&m->rcu);
    const egress_snap *s = egress_map_snap(m, 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t e = 0, g = 0, p = 0;
        status[i] = (uint8_t)egress_snap_lookup4p(s, src[i], dst[i], &e, &g, &p);
        egress[i] = e;
        gateway[i] = g;
        if (policy) policy[i] = p;
    }
    lpm_rcu_exit(&m->rcu, idx);
}

static void egress_map_lookup6_batch(egress_map *m, const uint8_t *src, const uint8_t *dst, size_t n,
                                     uint8_t *egress, uint8_t *gateway, uint8_t *status, uint32_t *policy) {
    unsigned idx = lpm_rcu_enter(&m->rcu);
    const egress_snap *s = egress_map_snap(m, 1);
    for (size_t i = 0; i < n; i++) {
        egress_val6 v;
        memset(&v, 0, sizeof(v));
        const uint8_t *a = src + 16 * i, *b = dst + 16 * i;
        status[i] = (uint8_t)egress_snap_lookup6(s, be_load64(a), be_load64(a + 8),
                                                 be_load64(b), be_load64(b + 8), &v);
        be_store64(egress + 16 * i, v.e_hi);
        be_store64(egress + 16 * i + 8, v.e_lo);
        be_store64(gateway + 16 * i, v.g_hi);
        be_store64(gateway + 16 * i + 8, v.g_lo);
        if (policy) policy[i] = v.policy;
    }
    lpm_rcu_exit(&m->rcu, idx);
}

static void egress_snap_free(egress_snap *s) {
    if (!s) return;
    free(s->slots);
    free(s);
}

static void egress_snap_put(egress_snap *s, uint64_t hi, uint64_t lo, lpm_table *tbl) {
    uint32_t mask = (1u << s->bits) - 1;
    uint32_t h = egress_hash(hi, lo, s->bits);
    while (s->slots[h].tbl) h = (h + 1) & mask;
    s->slots[h].hi = hi;
    s->slots[h].lo = lo;
    s->slots[h].tbl = tbl;
    s->n++;
}

/* A copy of `old` in which source (hi, lo) maps to tbl (NULL: removed).
 * *replaced receives the table it displaced.  NULL on out of memory. */
static egress_snap *egress_snap_with(const egress_snap *old, uint64_t hi, uint64_t lo,
                                     lpm_table *tbl, lpm_table **replaced) {
    uint32_t n = old ? old->n : 0;
    unsigned bits = 3;
    while (((uint32_t)1 << bits) < 2 * (n + 1)) bits++;
    egress_snap *s = (egress_snap *)calloc(1, sizeof(egress_snap));
    if (!s) return NULL;
    s->bits = bits;
    s->slots = (egress_slot *)calloc((size_t)1 << bits, sizeof(egress_slot));
    if (!s->slots) { free(s); return NULL; }
    *replaced = NULL;
    if (old) {
        for (size_t i = 0; i < ((size_t)1 << old->bits); i++) {
            const egress_slot *sl = &old->slots[i];
            if (!sl->tbl) continue;
            if (sl->hi == hi && sl->lo == lo) { *replaced = sl->tbl; continue; }
            egress_snap_put(s, sl->hi, sl->lo, sl->tbl);
        }
    }
    if (tbl) egress_snap_put(s, hi, lo, tbl);
    return s;
}

/* A fresh snapshot of n sources (hi[i], lo[i]) -> tbl[i]; NULL on OOM. */
static egress_snap *egress_snap_build(size_t n, const uint64_t *hi, const uint64_t *lo, lpm_table *const *tbl) {
    unsigned bits = 3;
    while (((size_t)1 << bits) < 2 * (n + 1)) bits++;
    egress_snap *s = (egress_snap *)calloc(1, sizeof(egress_snap));
    if (!s) return NULL;
    s->bits = bits;
    s->slots = (egress_slot *)calloc((size_t)1 << bits, sizeof(egress_slot));
    if (!s->slots) { free(s); return NULL; }
    for (size_t i = 0; i < n; i++) egress_snap_put(s, hi[i], lo[i], tbl[i]);
    return s;
}

/* A copy of `old` in which each of k distinct sources (hi[i], lo[i]) maps to
 * tbl[i] (NULL: removed), in one pass over `old`: a batch of writes copies
 * the index once, not once per write.  replaced[i] receives the table each
 * displaced.  NULL on out of memory. */
static egress_snap *egress_snap_with_many(const egress_snap *old, size_t k, const uint64_t *hi,
                                          const uint64_t *lo, lpm_table *const *tbl, lpm_table **replaced) {
    size_t n = (old ? old->n : 0) + k;
    unsigned bits = 3;
    while (((size_t)1 << bits) < 2 * (n + 1)) bits++;
    egress_snap *s = (egress_snap *)calloc(1, sizeof(egress_snap));
    lpm_table **marks = (lpm_table **)malloc((k ? k : 1) * sizeof(lpm_table *));
    egress_snap *idx = NULL;
    if (!s || !marks) goto oom;
    s->bits = bits;
    s->slots = (egress_slot *)calloc((size_t)1 << bits, sizeof(egress_slot));
    if (!s->slots) goto oom;
    for (size_t i = 0; i < k; i++) {
        marks[i] = (lpm_table *)(uintptr_t)(i + 1);  /* the slot's "table" is the update's index + 1 */
        replaced[i] = NULL;
    }
    idx = egress_snap_build(k, hi, lo, marks);
    if (!idx) goto oom;
    if (old) {
        for (size_t j = 0; j < ((size_t)1 << old->bits); j++) {
            const egress_slot *sl = &old->slots[j];
            if (!sl->tbl) continue;
            const egress_slot *u = egress_snap_find(idx, sl->hi, sl->lo);
            if (u) { replaced[(uintptr_t)u->tbl - 1] = sl->tbl; continue; }
            egress_snap_put(s, sl->hi, sl->lo, sl->tbl);
        }
    }
    for (size_t i = 0; i < k; i++)
        if (tbl[i]) egress_snap_put(s, hi[i], lo[i], tbl[i]);
    free(idx->slots);
    free(idx);
    free(marks);
    return s;
oom:
    if (idx) { free(idx->slots); free(idx); }
    free(marks);
    if (s) { free(s->slots); free(s); }
    return NULL;
}

/* Publish snapshot s for a family, wait out readers, free the old snapshot
 * (not its tables: the caller frees the one table it replaced). */
static void egress_map_publish(egress_map *m, int v6, egress_snap *s) {
    egress_snap *old = m->snap[v6];
    __atomic_store_n(&m->snap[v6], s, __ATOMIC_SEQ_CST);
    lpm_rcu_sync(&m->rcu);
    egress_snap_free(old);
}

/* Free both snapshots and every per-source table they reference. */
static void egress_map_free_all(egress_map *m) {
    for (int f = 0; f < 2; f++) {
        egress_snap *s = m->snap[f];
        if (!s) continue;
        for (size_t i = 0; i < ((size_t)1 << s->bits); i++)
            if (s->slots[i].tbl) lpm_table_free(s->slots[i].tbl);
        egress_snap_free(s);
        m->snap[f] = NULL;
    }
}

#endif
