/* egresscore egress policy map: exact source -> per-source destination LPM.
 *
 * A snapshot is an open-addressing hash table (linear probing, load <= 1/2,
 * counting tombs) from source IP to that source's immutable egress_src: its
 * rows (destination prefix, egress IP, gateway IP, policy id: the
 * compiler's small number for the policy that wrote the entry, 0 for none,
 * which the datapath's per-policy counters are indexed by), sorted, with an
 * LPM table over them only when there are more than EGRESS_SMALL.  The rows
 * are the map's only copy of its entries (no Python object per entry).
 *
 * Writes make a new egress_src for each touched source and swap it into its
 * slot with one release store (in place: the cost of a change does not grow
 * with the number of sources); a batch, or a slot table short of room, gets
 * a fresh snapshot published with one atomic store.  What a write replaced
 * is freed after one lpm_rcu_sync grace period (lpm_core.h: readers in a
 * section of their own, one per call here or one per datapath batch).  A
 * lookup sees each source
 * either before or after a write, never a half-made one.
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

/* One row of a source: a destination prefix and its value, kept in C only
 * (the Python surface makes EgressEntry objects from rows on demand).  A
 * source's rows are sorted by (destination, length); a lookup's leaf value
 * is a row index. */
typedef struct { uint32_t dst, plen, egress, gateway, policy; } egress_row4;            /* 20 B */
typedef struct { uint64_t d_hi, d_lo, e_hi, e_lo, g_hi, g_lo; uint32_t plen, policy; } egress_row6; /* 56 B */

/* Up to this many rows a source has no LPM table: a lookup scans the rows
 * (a handful of mask-and-compares, no table to miss in the cache).  A
 * table over 3 prefixes costs ~1.5 KB in five allocations; the rows 60 B. */
#define EGRESS_SMALL 16

typedef struct {
    uint32_t n;             /* rows */
    uint32_t v6;
    lpm_table *tbl;         /* NULL when n <= EGRESS_SMALL */
    /* n rows follow (egress_row4 or egress_row6), sorted by (dst, plen) */
} egress_src;

#define EGRESS_ROWS4(s) ((egress_row4 *)((egress_src *)(s) + 1))
#define EGRESS_ROWS6(s) ((egress_row6 *)((egress_src *)(s) + 1))

/* A removed source's slot: probes pass over it.  It is reused only for the
 * same source (a reader mid-probe never sees a slot's key change). */
#define EGRESS_TOMB ((egress_src *)(uintptr_t)1)

typedef struct {
    uint64_t hi, lo;        /* IPv4: hi = host-order source, lo = 0 */
    egress_src *src;        /* NULL: empty slot; EGRESS_TOMB: removed */
} egress_slot;

typedef struct {
    uint32_t bits;          /* capacity 1 << bits */
    uint32_t n;             /* live sources */
    uint32_t tombs;
    uint32_t pad;
    egress_slot *slots;
} egress_snap;

typedef struct { uint64_t e_hi, e_lo, g_hi, g_lo; uint32_t policy, _pad; } egress_val6;

typedef struct {
    egress_snap *snap[2];   /* [0] IPv4, [1] IPv6 */
} egress_map;

static inline uint32_t egress_hash(uint64_t hi, uint64_t lo, unsigned bits) {
    uint64_t x = (hi ^ (lo * 0xC2B2AE3D27D4EB4FULL)) * 0x9E3779B97F4A7C15ULL;
    return (uint32_t)(x >> (64 - bits));
}

/* The source's rows, or NULL.  Readers may run while the writer changes a
 * slot in place: the writer fills a new slot's key before it release-stores
 * its src, a reader acquire-loads src before it reads the key. */
static inline const egress_src *egress_snap_find(const egress_snap *s, uint64_t hi, uint64_t lo) {
    if (!s) return NULL;
    uint32_t mask = (1u << s->bits) - 1;
    uint32_t h = egress_hash(hi, lo, s->bits);
    for (;;) {
        const egress_slot *sl = &s->slots[h];
        egress_src *p = __atomic_load_n(&sl->src, __ATOMIC_ACQUIRE);
        if (!p) return NULL;
        if (p != EGRESS_TOMB && sl->hi == hi && sl->lo == lo) return p;
        h = (h + 1) & mask;
    }
}

static inline uint64_t egress_mask64(uint32_t plen) {
    return plen == 0 ? 0 : (plen >= 64 ? ~(uint64_t)0 : ~(uint64_t)0 << (64 - plen));
}

/* Index of the longest row of source s containing dst, or -1. */
static inline long egress_src_match4(const egress_src *s, uint32_t dst) {
    if (s->tbl) {
        uint32_t v = lpm4_table_lookup(s->tbl, dst);
        return v == LPM_NONE ? -1 : (long)v;
    }
    const egress_row4 *r = EGRESS_ROWS4(s);
    long best = -1;
    uint32_t bl = 0;
    for (uint32_t i = 0; i < s->n; i++) {
        uint32_t m = r[i].plen ? ~(uint32_t)0 << (32 - r[i].plen) : 0;
        if (((dst ^ r[i].dst) & m) == 0 && (best < 0 || r[i].plen > bl)) { best = i; bl = r[i].plen; }
    }
    return best;
}

static inline long egress_src_match6(const egress_src *s, uint64_t hi, uint64_t lo) {
    if (s->tbl) {
        uint32_t v = lpm6_table_lookup(s->tbl, hi, lo);
        return v == LPM_NONE ? -1 : (long)v;
    }
    const egress_row6 *r = EGRESS_ROWS6(s);
    long best = -1;
    uint32_t bl = 0;
    for (uint32_t i = 0; i < s->n; i++) {
        uint32_t p = r[i].plen;
        uint64_t mh = egress_mask64(p), ml = p > 64 ? egress_mask64(p - 64) : 0;
        if (((hi ^ r[i].d_hi) & mh) == 0 && ((lo ^ r[i].d_lo) & ml) == 0 && (best < 0 || p > bl)) {
            best = i;
            bl = p;
        }
    }
    return best;
}

/* Returns an EGRESS_* status; egress/gateway/policy are set unless EGRESS_NO_MATCH. */
static inline int egress_snap_lookup4p(const egress_snap *s, uint32_t src, uint32_t dst,
                                       uint32_t *egress, uint32_t *gateway, uint32_t *policy) {
    const egress_src *es = egress_snap_find(s, src, 0);
    if (!es) return EGRESS_NO_MATCH;
    long v = egress_src_match4(es, dst);
    if (v < 0) return EGRESS_NO_MATCH;
    const egress_row4 *val = EGRESS_ROWS4(es) + v;
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
    const egress_src *es = egress_snap_find(s, src_hi, src_lo);
    if (!es) return EGRESS_NO_MATCH;
    long v = egress_src_match6(es, dst_hi, dst_lo);
    if (v < 0) return EGRESS_NO_MATCH;
    const egress_row6 *r = EGRESS_ROWS6(es) + v;
    out->e_hi = r->e_hi;
    out->e_lo = r->e_lo;
    out->g_hi = r->g_hi;
    out->g_lo = r->g_lo;
    out->policy = r->policy;
    if (out->g_hi == 0 && out->g_lo == EGRESS_GW_NOT_FOUND) return EGRESS_NO_GATEWAY;
    if (out->g_hi == 0 && out->g_lo == EGRESS_GW_EXCLUDED) return EGRESS_EXCLUDED;
    return EGRESS_MATCH;
}

static inline const egress_snap *egress_map_snap(egress_map *m, int v6) {
    return __atomic_load_n(&m->snap[v6], __ATOMIC_ACQUIRE);
}

/* egress_map_lookup4 that also gives the entry's policy id (0: none), inside
 * the caller's read section (lpm_rcu_read_lock: the datapath's batch). */
static inline int egress_map_lookup4p_in(egress_map *m, uint32_t src, uint32_t dst,
                                         uint32_t *egress, uint32_t *gateway, uint32_t *policy) {
    LPM_RCU_ASSERT_READING();
    return egress_snap_lookup4p(egress_map_snap(m, 0), src, dst, egress, gateway, policy);
}

/* The same in a read section of its own. */
static inline int egress_map_lookup4p(egress_map *m, uint32_t src, uint32_t dst,
                                      uint32_t *egress, uint32_t *gateway, uint32_t *policy) {
    lpm_rcu_read_lock();
    int r = egress_map_lookup4p_in(m, src, dst, egress, gateway, policy);
    lpm_rcu_read_unlock();
    return r;
}

static inline int egress_map_lookup4(egress_map *m, uint32_t src, uint32_t dst,
                                     uint32_t *egress, uint32_t *gateway) {
    uint32_t policy;
    return egress_map_lookup4p(m, src, dst, egress, gateway, &policy);
}

/* The IPv6 lookup as the datapath needs it: also the entry's policy id,
 * and its gateway split in two words (an entry's gateway is the gateway
 * node's IPv4 underlay address as ::ffff:a.b.c.d, the compiler keeping an
 * entry's four addresses in one family: g_hi == 0, g_lo >> 32 == 0xffff).
 * egress16, g_hi, g_lo and policy are set unless EGRESS_NO_MATCH.  Inside
 * the caller's read section. */
static inline int egress_map_lookup6p_in(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                                         uint8_t *egress16, uint64_t *g_hi, uint64_t *g_lo,
                                         uint32_t *policy) {
    egress_val6 v;
    LPM_RCU_ASSERT_READING();
    int r = egress_snap_lookup6(egress_map_snap(m, 1), be_load64(src16), be_load64(src16 + 8),
                                be_load64(dst16), be_load64(dst16 + 8), &v);
    if (r != EGRESS_NO_MATCH) {
        be_store64(egress16, v.e_hi);
        be_store64(egress16 + 8, v.e_lo);
        *g_hi = v.g_hi;
        *g_lo = v.g_lo;
        *policy = v.policy;
    }
    return r;
}

/* The same in a read section of its own. */
static inline int egress_map_lookup6p(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                                      uint8_t *egress16, uint64_t *g_hi, uint64_t *g_lo,
                                      uint32_t *policy) {
    lpm_rcu_read_lock();
    int r = egress_map_lookup6p_in(m, src16, dst16, egress16, g_hi, g_lo, policy);
    lpm_rcu_read_unlock();
    return r;
}

static inline int egress_map_lookup6(egress_map *m, const uint8_t *src16, const uint8_t *dst16,
                                     uint8_t *egress16, uint8_t *gateway16) {
    uint64_t g_hi, g_lo;
    uint32_t policy;
    int r = egress_map_lookup6p(m, src16, dst16, egress16, &g_hi, &g_lo, &policy);
    if (r != EGRESS_NO_MATCH) {
        be_store64(gateway16, g_hi);
        be_store64(gateway16 + 8, g_lo);
    }
    return r;
}

/* policy (or NULL) receives each entry's policy id, 0 where status is EGRESS_NO_MATCH. */
static void egress_map_lookup4_batch(egress_map *m, const uint32_t *src, const uint32_t *dst, size_t n,
                                     uint32_t *egress, uint32_t *gateway, uint8_t *status, uint32_t *policy) {
    lpm_rcu_read_lock();
    const egress_snap *s = egress_map_snap(m, 0);
    for (size_t i = 0; i < n; i++) {
        uint32_t e = 0, g = 0, p = 0;
        status[i] = (uint8_t)egress_snap_lookup4p(s, src[i], dst[i], &e, &g, &p);
        egress[i] = e;
        gateway[i] = g;
        if (policy) policy[i] = p;
    }
    lpm_rcu_read_unlock();
}

static void egress_map_lookup6_batch(egress_map *m, const uint8_t *src, const uint8_t *dst, size_t n,
                                     uint8_t *egress, uint8_t *gateway, uint8_t *status, uint32_t *policy) {
    lpm_rcu_read_lock();
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
    lpm_rcu_read_unlock();
}

/* ---- the writer (holds the GIL; one at a time) ---------------------------- */

static void egress_src_free(egress_src *s) {
    if (!s || s == EGRESS_TOMB) return;
    lpm_table_free(s->tbl);
    free(s);
}

static void egress_snap_free(egress_snap *s) {
    if (!s) return;
    free(s->slots);
    free(s);
}

static egress_snap *egress_snap_new(size_t n) {
    unsigned bits = 3;
    while (((size_t)1 << bits) < 2 * (n + 1)) bits++;
    egress_snap *s = (egress_snap *)calloc(1, sizeof(egress_snap));
    if (!s) return NULL;
    s->bits = bits;
    s->slots = (egress_slot *)calloc((size_t)1 << bits, sizeof(egress_slot));
    if (!s->slots) { free(s); return NULL; }
    return s;
}

/* Put a source not yet in s (no live slot, no tomb of its key) into a free slot. */
static void egress_snap_put(egress_snap *s, uint64_t hi, uint64_t lo, egress_src *src) {
    uint32_t mask = (1u << s->bits) - 1;
    uint32_t h = egress_hash(hi, lo, s->bits);
    while (s->slots[h].src) h = (h + 1) & mask;
    s->slots[h].hi = hi;
    s->slots[h].lo = lo;
    __atomic_store_n(&s->slots[h].src, src, __ATOMIC_RELEASE);
    s->n++;
}

/* The slot holding source (hi, lo), live or a tomb, or NULL. */
static egress_slot *egress_snap_slot(egress_snap *s, uint64_t hi, uint64_t lo) {
    if (!s) return NULL;
    uint32_t mask = (1u << s->bits) - 1;
    uint32_t h = egress_hash(hi, lo, s->bits);
    for (;;) {
        egress_slot *sl = &s->slots[h];
        if (!sl->src) return NULL;
        if (sl->hi == hi && sl->lo == lo) return sl;
        h = (h + 1) & mask;
    }
}

/* A fresh snapshot of n sources (hi[i], lo[i]) -> src[i]; NULL on OOM. */
static egress_snap *egress_snap_build(size_t n, const uint64_t *hi, const uint64_t *lo, egress_src *const *src) {
    egress_snap *s = egress_snap_new(n);
    if (!s) return NULL;
    for (size_t i = 0; i < n; i++) egress_snap_put(s, hi[i], lo[i], src[i]);
    return s;
}

/* A source of n rows (copied; sorted by (dst, plen), no duplicates), with
 * an LPM table over them when there are more than EGRESS_SMALL.  NULL on OOM. */
static egress_src *egress_src_new(int v6, size_t n, const void *rows) {
    size_t rs = v6 ? sizeof(egress_row6) : sizeof(egress_row4);
    egress_src *s = (egress_src *)malloc(sizeof(egress_src) + n * rs);
    if (!s) return NULL;
    s->n = (uint32_t)n;
    s->v6 = (uint32_t)v6;
    s->tbl = NULL;
    memcpy(s + 1, rows, n * rs);
    if (n > EGRESS_SMALL) {
        lpm_entry *e = (lpm_entry *)malloc(n * sizeof(lpm_entry));
        if (!e) { free(s); return NULL; }
        for (size_t i = 0; i < n; i++) {
            if (v6) {
                e[i].hi = EGRESS_ROWS6(s)[i].d_hi;
                e[i].lo = EGRESS_ROWS6(s)[i].d_lo;
                e[i].len = EGRESS_ROWS6(s)[i].plen;
            } else {
                e[i].hi = (uint64_t)EGRESS_ROWS4(s)[i].dst << 32;
                e[i].lo = 0;
                e[i].len = EGRESS_ROWS4(s)[i].plen;
            }
            e[i].val = (uint32_t)i;
        }
        s->tbl = lpm_table_build(e, n, v6 ? 128 : 32);
        free(e);
        if (!s->tbl) { free(s); return NULL; }
    }
    return s;
}

static size_t egress_src_bytes(const egress_src *s) {
    if (!s || s == EGRESS_TOMB) return 0;
    return sizeof(egress_src) + s->n * (s->v6 ? sizeof(egress_row6) : sizeof(egress_row4))
        + (s->tbl ? lpm_table_bytes(s->tbl) : 0);
}

/* A row as the Python surface hands it in: both families in one shape.
 * IPv4: the addresses in the *_hi fields (host order), *_lo = 0. */
typedef struct {
    uint64_t s_hi, s_lo, d_hi, d_lo, e_hi, e_lo, g_hi, g_lo;
    uint32_t plen, policy;
    uint32_t v6, op;        /* op: 0 set, 1 remove */
    uint64_t seq;           /* input order: later wins, sets before removes */
} egress_wrow;

static int egress_wrow_cmp(const void *pa, const void *pb) {
    const egress_wrow *a = (const egress_wrow *)pa, *b = (const egress_wrow *)pb;
#define EGRESS_CMP(f) if (a->f != b->f) return a->f < b->f ? -1 : 1
    EGRESS_CMP(v6); EGRESS_CMP(s_hi); EGRESS_CMP(s_lo); EGRESS_CMP(d_hi); EGRESS_CMP(d_lo);
    EGRESS_CMP(plen); EGRESS_CMP(seq);
#undef EGRESS_CMP
    return 0;
}

static void egress_wrows_sort(egress_wrow *w, size_t n) {
    qsort(w, n, sizeof(egress_wrow), egress_wrow_cmp);
}

/* Key order of an existing row against a wide row: -1, 0, 1. */
static inline int egress_rowkey_cmp(const egress_src *s, size_t i, const egress_wrow *w) {
    uint64_t h, l;
    uint32_t p;
    if (s->v6) { h = EGRESS_ROWS6(s)[i].d_hi; l = EGRESS_ROWS6(s)[i].d_lo; p = EGRESS_ROWS6(s)[i].plen; }
    else { h = EGRESS_ROWS4(s)[i].dst; l = 0; p = EGRESS_ROWS4(s)[i].plen; }
    if (h != w->d_hi) return h < w->d_hi ? -1 : 1;
    if (l != w->d_lo) return l < w->d_lo ? -1 : 1;
    if (p != w->plen) return p < w->plen ? -1 : 1;
    return 0;
}

static inline void egress_row_from(int v6, void *out, size_t k, const egress_wrow *w) {
    if (v6) {
        egress_row6 *r = (egress_row6 *)out + k;
        r->d_hi = w->d_hi; r->d_lo = w->d_lo; r->e_hi = w->e_hi; r->e_lo = w->e_lo;
        r->g_hi = w->g_hi; r->g_lo = w->g_lo; r->plen = w->plen; r->policy = w->policy;
    } else {
        egress_row4 *r = (egress_row4 *)out + k;
        r->dst = (uint32_t)w->d_hi; r->plen = w->plen; r->egress = (uint32_t)w->e_hi;
        r->gateway = (uint32_t)w->g_hi; r->policy = w->policy;
    }
}

/* Merge the m wide rows w (one source, sorted) with that source's current
 * rows `old` (NULL: none).  mode 0 (sync): the result is exactly w's rows
 * (the last of equal keys wins); mode 1 (update): w's sets and removes
 * applied over old, in seq order.  *out: the new source (NULL: no rows),
 * `old` itself when nothing changed.  counts[0..2] += added, removed,
 * changed rows.  Returns 0; -1 out of memory; -2 - j: w[j] removes a key
 * that is not there. */
static long egress_src_merge(const egress_src *old, int v6, const egress_wrow *w, size_t m, int mode,
                             egress_src **out, size_t *counts) {
    size_t rs = v6 ? sizeof(egress_row6) : sizeof(egress_row4);
    size_t on = old ? old->n : 0;
    char *tmp = (char *)malloc((on + m + 1) * rs);
    union { egress_row4 r4; egress_row6 r6; } cur;
    size_t i = 0, j = 0, k = 0, added = 0, removed = 0, changed = 0;
    if (!tmp) return -1;
    while (i < on || j < m) {
        int c = i == on ? 1 : (j == m ? -1 : egress_rowkey_cmp(old, i, &w[j]));
        int existed = c <= 0, exists;
        const char *orow = existed ? (const char *)(old + 1) + i * rs : NULL;
        if (existed) memcpy(&cur, orow, rs);
        exists = existed;
        if (c < 0) {
            exists = mode == 1;     /* a key only in old: kept by update, gone in sync */
            i++;
        } else {
            size_t j0 = j;
            while (j < m && (j == j0 || (w[j].d_hi == w[j0].d_hi && w[j].d_lo == w[j0].d_lo
                                         && w[j].plen == w[j0].plen))) {
                if (w[j].op == 0) {
                    egress_row_from(v6, &cur, 0, &w[j]);
                    exists = 1;
                } else {
                    if (!exists) { free(tmp); return -2 - (long)j; }
                    exists = 0;
                }
                j++;
            }
            if (c == 0) i++;
        }
        if (exists) memcpy(tmp + k++ * rs, &cur, rs);
        if (existed && !exists) removed++;
        else if (!existed && exists) added++;
        else if (existed && exists && memcmp(&cur, orow, rs) != 0) changed++;
    }
    if (!added && !removed && !changed) {
        free(tmp);
        *out = (egress_src *)old;
        return 0;
    }
    egress_src *s = NULL;
    if (k) {
        s = egress_src_new(v6, k, tmp);
        if (!s) { free(tmp); return -1; }
    }
    free(tmp);
    counts[0] += added;
    counts[1] += removed;
    counts[2] += changed;
    *out = s;
    return 0;
}

/* Free, after a failed batch, the sources made for it (those not in use). */
static void egress_srcs_discard(size_t n, egress_src **made, egress_src *const *old) {
    for (size_t i = 0; i < n; i++)
        if (made[i] != old[i]) egress_src_free(made[i]);
}

/* sync: the map's sources become exactly those of the n sorted wide rows
 * (both families).  Sources whose rows are unchanged are kept (shared by
 * the new snapshot); each family that changed gets a fresh snapshot,
 * published once; what they displaced is freed after one grace period.
 * counts[0..2] += added, removed, changed rows.  Returns 0, or -1 out of
 * memory (nothing changed). */
static int egress_map_sync_rows(egress_map *m, const egress_wrow *w, size_t n, size_t *counts) {
    size_t groups = 0, g = 0, n4 = 0, c[3] = {0, 0, 0};
    for (size_t a = 0; a < n; a++)
        if (a == 0 || w[a].v6 != w[a - 1].v6 || w[a].s_hi != w[a - 1].s_hi || w[a].s_lo != w[a - 1].s_lo) {
            groups++;
            if (!w[a].v6) n4++;
        }
    uint64_t *hi = (uint64_t *)malloc((groups + 1) * sizeof(uint64_t));
    uint64_t *lo = (uint64_t *)malloc((groups + 1) * sizeof(uint64_t));
    egress_src **made = (egress_src **)malloc((groups + 1) * sizeof(egress_src *));
    egress_src **was = (egress_src **)malloc((groups + 1) * sizeof(egress_src *));
    egress_snap *fresh[2] = {NULL, NULL}, *prev[2] = {NULL, NULL};
    int dirty[2] = {0, 0};
    if (!hi || !lo || !made || !was) goto oom;
    for (size_t a = 0; a < n;) {
        size_t b = a + 1;
        while (b < n && w[b].v6 == w[a].v6 && w[b].s_hi == w[a].s_hi && w[b].s_lo == w[a].s_lo) b++;
        int f = (int)w[a].v6;
        const egress_src *old = egress_snap_find(m->snap[f], w[a].s_hi, w[a].s_lo);
        hi[g] = w[a].s_hi;
        lo[g] = w[a].s_lo;
        was[g] = (egress_src *)old;
        if (egress_src_merge(old, f, w + a, b - a, 0, &made[g], c) < 0) goto oom_g;
        if (made[g] != old) dirty[f] = 1;
        g++;
        a = b;
    }
    for (int f = 0; f < 2; f++) {
        size_t g0 = f ? n4 : 0, g1 = f ? groups : n4;
        egress_snap *s = m->snap[f];
        size_t live = s ? s->n : 0;
        if (!dirty[f] && live == g1 - g0) continue;   /* the same sources, every one unchanged */
        dirty[f] = 1;
        fresh[f] = egress_snap_build(g1 - g0, hi + g0, lo + g0, made + g0);
        if (!fresh[f]) goto oom_all;
        if (s)
            for (size_t x = 0; x < ((size_t)1 << s->bits); x++) {
                egress_slot *sl = &s->slots[x];
                if (sl->src && sl->src != EGRESS_TOMB && !egress_snap_find(fresh[f], sl->hi, sl->lo))
                    c[1] += sl->src->n;
            }
    }
    for (int f = 0; f < 2; f++)
        if (dirty[f]) {
            prev[f] = m->snap[f];
            __atomic_store_n(&m->snap[f], fresh[f], __ATOMIC_SEQ_CST);
        }
    if (dirty[0] || dirty[1]) lpm_rcu_sync();
    for (int f = 0; f < 2; f++) {
        egress_snap *s = prev[f];
        if (!s) continue;
        for (size_t x = 0; x < ((size_t)1 << s->bits); x++) {
            egress_slot *sl = &s->slots[x];
            if (sl->src && sl->src != EGRESS_TOMB && egress_snap_find(fresh[f], sl->hi, sl->lo) != sl->src)
                egress_src_free(sl->src);
        }
        egress_snap_free(s);
    }
    counts[0] += c[0];
    counts[1] += c[1];
    counts[2] += c[2];
    free(hi); free(lo); free(made); free(was);
    return 0;
oom_all:
    egress_snap_free(fresh[0]);
    egress_snap_free(fresh[1]);
oom_g:
    egress_srcs_discard(g, made, was);
oom:
    free(hi); free(lo); free(made); free(was);
    return -1;
}

/* Point k distinct sources of family f at src[i] (NULL: removed), in place
 * when the snapshot has room (each a single release store of its slot, the
 * per-change cost flat in the number of sources), else in a fresh, larger
 * snapshot published once (*prev receives the one it replaced, to free
 * after the grace period).  -1 out of memory (nothing changed). */
static int egress_map_put_many(egress_map *m, int f, size_t k, const uint64_t *hi, const uint64_t *lo,
                               egress_src *const *src, egress_snap **prev) {
    egress_snap *s = m->snap[f];
    size_t inserts = 0;
    *prev = NULL;
    for (size_t i = 0; i < k; i++)
        if (src[i] && !egress_snap_slot(s, hi[i], lo[i])) inserts++;
    if (!s || 2 * ((size_t)s->n + s->tombs + inserts + 1) > ((size_t)1 << s->bits)) {
        size_t want = (s ? s->n : 0) + k;
        egress_snap *t = egress_snap_new(want + want / 2);
        egress_snap *idx = egress_snap_new(k);   /* the updated keys (value: index + 2, never a tomb) */
        if (!t || !idx) { egress_snap_free(t); egress_snap_free(idx); return -1; }
        for (size_t i = 0; i < k; i++) {
            egress_snap_put(idx, hi[i], lo[i], (egress_src *)(uintptr_t)(i + 2));
            if (src[i]) egress_snap_put(t, hi[i], lo[i], src[i]);
        }
        if (s)
            for (size_t x = 0; x < ((size_t)1 << s->bits); x++) {
                egress_slot *sl = &s->slots[x];
                if (!sl->src || sl->src == EGRESS_TOMB || egress_snap_find(idx, sl->hi, sl->lo)) continue;
                egress_snap_put(t, sl->hi, sl->lo, sl->src);
            }
        egress_snap_free(idx);
        __atomic_store_n(&m->snap[f], t, __ATOMIC_SEQ_CST);
        *prev = s;
        return 0;
    }
    for (size_t i = 0; i < k; i++) {
        egress_slot *sl = egress_snap_slot(s, hi[i], lo[i]);
        if (sl) {
            int live = sl->src != EGRESS_TOMB;
            if (src[i]) {
                if (!live) { s->tombs--; s->n++; }
                __atomic_store_n(&sl->src, src[i], __ATOMIC_RELEASE);
            } else if (live) {
                __atomic_store_n(&sl->src, EGRESS_TOMB, __ATOMIC_RELEASE);
                s->n--;
                s->tombs++;
            }
        } else if (src[i]) {
            egress_snap_put(s, hi[i], lo[i], src[i]);
        }
    }
    return 0;
}

/* clear: publish empty maps, then free every source after the grace period. */
static void egress_map_clear(egress_map *m) {
    egress_snap *prev[2] = {m->snap[0], m->snap[1]};
    __atomic_store_n(&m->snap[0], (egress_snap *)NULL, __ATOMIC_SEQ_CST);
    __atomic_store_n(&m->snap[1], (egress_snap *)NULL, __ATOMIC_SEQ_CST);
    lpm_rcu_sync();
    for (int f = 0; f < 2; f++) {
        egress_snap *s = prev[f];
        if (!s) continue;
        for (size_t i = 0; i < ((size_t)1 << s->bits); i++) egress_src_free(s->slots[i].src);
        egress_snap_free(s);
    }
}

/* update: the n sorted wide rows' sets and removes applied (a batch of
 * writes; each touched source gets new rows once, swapped in with one
 * store, one grace period for the batch).  All or nothing.  *delta: the
 * change in the number of rows.  Returns 0; -1 out of memory; -2 - j:
 * w[j] removes a key that is not there. */
static long egress_map_update_rows(egress_map *m, const egress_wrow *w, size_t n, long *delta) {
    size_t groups = 0, g = 0, c[3] = {0, 0, 0};
    long r = 0;
    for (size_t a = 0; a < n; a++)
        if (a == 0 || w[a].v6 != w[a - 1].v6 || w[a].s_hi != w[a - 1].s_hi || w[a].s_lo != w[a - 1].s_lo) groups++;
    uint64_t *hi = (uint64_t *)malloc((groups + 1) * sizeof(uint64_t));
    uint64_t *lo = (uint64_t *)malloc((groups + 1) * sizeof(uint64_t));
    egress_src **made = (egress_src **)malloc((groups + 1) * sizeof(egress_src *));
    egress_src **was = (egress_src **)malloc((groups + 1) * sizeof(egress_src *));
    egress_snap *prev[2] = {NULL, NULL};
    size_t n4 = 0, k = 0;
    if (!hi || !lo || !made || !was) { r = -1; goto out; }
    for (size_t a = 0; a < n;) {
        size_t b = a + 1;
        while (b < n && w[b].v6 == w[a].v6 && w[b].s_hi == w[a].s_hi && w[b].s_lo == w[a].s_lo) b++;
        int f = (int)w[a].v6;
        const egress_src *old = egress_snap_find(m->snap[f], w[a].s_hi, w[a].s_lo);
        egress_src *nw;
        long e = egress_src_merge(old, f, w + a, b - a, 1, &nw, c);
        if (e < 0) {
            egress_srcs_discard(k, made, was);
            r = e == -1 ? -1 : e - (long)a;   /* -2 - j of the group -> -2 - (a + j) */
            goto out;
        }
        if (nw != old) {   /* only the changed sources are written */
            hi[k] = w[a].s_hi;
            lo[k] = w[a].s_lo;
            made[k] = nw;
            was[k] = (egress_src *)old;
            if (!f) n4++;
            k++;
        }
        g++;
        a = b;
    }
    for (int f = 0; f < 2; f++) {
        size_t g0 = f ? n4 : 0, g1 = f ? k : n4;
        if (g1 == g0) continue;
        if (egress_map_put_many(m, f, g1 - g0, hi + g0, lo + g0, made + g0, &prev[f]) < 0) {
            if (f == 1 && n4) {
                /* IPv4 is already in place: undo it (the old sources are still alive) */
                egress_snap *p0 = NULL;
                if (egress_map_put_many(m, 0, n4, hi, lo, was, &p0) == 0) {
                    lpm_rcu_sync();
                    egress_snap_free(p0);
                    egress_snap_free(prev[0]);
                    prev[0] = NULL;
                }
            }
            egress_srcs_discard(k, made, was);
            r = -1;
            goto out;
        }
    }
    if (k) lpm_rcu_sync();
    for (size_t i = 0; i < k; i++) egress_src_free(was[i]);
    egress_snap_free(prev[0]);
    egress_snap_free(prev[1]);
    *delta = (long)c[0] - (long)c[1];
out:
    free(hi); free(lo); free(made); free(was);
    (void)g;
    return r;
}

/* Free both snapshots and every source they hold. */
static void egress_map_free_all(egress_map *m) {
    for (int f = 0; f < 2; f++) {
        egress_snap *s = m->snap[f];
        if (!s) continue;
        for (size_t i = 0; i < ((size_t)1 << s->bits); i++) egress_src_free(s->slots[i].src);
        egress_snap_free(s);
        m->snap[f] = NULL;
    }
}

/* Index of the row of s with key (d_hi, d_lo, plen), or -1. */
static long egress_src_find_row(const egress_src *s, uint64_t d_hi, uint64_t d_lo, uint32_t plen) {
    egress_wrow key;
    size_t a = 0, b = s->n;
    key.d_hi = d_hi;
    key.d_lo = d_lo;
    key.plen = plen;
    while (a < b) {
        size_t mid = a + (b - a) / 2;
        int c = egress_rowkey_cmp(s, mid, &key);
        if (c == 0) return (long)mid;
        if (c < 0) a = mid + 1;
        else b = mid;
    }
    return -1;
}

#endif
