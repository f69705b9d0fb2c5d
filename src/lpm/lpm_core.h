/* egresscore LPM core: a poptrie-style compressed multibit trie.
 *
 * Layout (see the module docstring of lpm.pyx for the why):
 *   direct[1 << dbits]   top dbits of the key index this array; an entry is
 *                        either a leaf value (bit 31 clear) or
 *                        LPM_NODE | node index.
 *   nodes[]              internal nodes of 6-bit strides: `vector` has bit v
 *                        set when slot v is an internal node (children stored
 *                        contiguously from base1, ranked by popcount), and
 *                        `leafvec` has bit v set where a run of equal leaf
 *                        values starts (leaves stored from base0).
 *   leaves[]             leaf-pushed values (the longest prefix that covers
 *                        the slot), LPM_NONE where nothing matches.
 *
 * A table is immutable once built: updates build a fresh table and publish
 * it with one atomic pointer store; the old one is freed after a grace
 * period (lpm_rcu_sync, below) so a concurrent reader never sees a half-made
 * table, nor one freed under it.
 *
 * Keys are 128-bit (hi, lo) left aligned: IPv4 a.b.c.d is hi = addr << 32.
 */
#ifndef EGRESSCORE_LPM_CORE_H
#define EGRESSCORE_LPM_CORE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#if defined(__GLIBC__) || defined(__linux__)
#include <malloc.h>
#include "alloc.h"
#include "byteorder.h"
#define LPM_HAVE_MALLOC_TRIM 1
#endif

/* The lookups rank children and leaves with popcount: make it the one
 * POPCNT instruction (x86-64-v2, every x86 CPU since 2008) rather than
 * libgcc's bit-twiddling fallback, which costs 3x on the lookup path. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__POPCNT__)
#pragma GCC push_options
#pragma GCC target("popcnt")
#define LPM_POPCNT_PUSHED 1
#endif

#define LPM_NODE 0x80000000u
#define LPM_SKIP 0x80000000u   /* in base1: a path-compressed IPv6 node */
#define LPM_TERM 0x40000000u   /* with LPM_SKIP: the subtree is one prefix
                                  (so node indices stay below 2^30) */
#define LPM_NONE 0x7FFFFFFFu
#define LPM_VALUE_MAX 0x7FFFFFFEu

typedef struct {
    uint64_t vector;
    uint64_t leafvec;
    uint32_t base1;     /* first child node */
    uint32_t base0;     /* first leaf */
} lpm_node;

typedef struct {
    uint32_t dbits;
    uint32_t n_nodes;
    uint32_t n_leaves;
    uint32_t cap_nodes;     /* allocated; the tail past n_* takes patches */
    uint32_t cap_leaves;
    uint32_t pad;
    uint32_t *direct;
    lpm_node *nodes;
    uint32_t *leaves;
    void *aux;          /* owner data freed with the table (egress values) */
    size_t aux_bytes;
} lpm_table;

typedef struct {
    uint64_t hi, lo;
    uint32_t val;
    uint32_t len;
} lpm_entry;

/* ---- grace periods: per-reader epoch slots (QSBR / SRCU-like) ------------
 * One read-side domain for every table of the process.  Each reader thread
 * owns one cache-line-sized slot (lpm_reader), claimed on its first read
 * section and given back when the thread exits; no two threads ever write
 * the same line.  A section:
 *
 *   lpm_rcu_read_lock()      the slot's `active` := the grace-period epoch,
 *                            then one full fence (orders that store before
 *                            the section's loads; no locked operation on a
 *                            shared line), nesting counted
 *   ... any number of lookups in any table: plain loads, no atomics ...
 *   lpm_rcu_read_unlock()    `active` := 0 (a release store)
 *
 * The writer publishes a new pointer, then lpm_rcu_sync() advances the
 * epoch to E and waits until every slot is outside a section (0) or inside
 * one it entered at E or later (such a reader loaded the pointer after it
 * was published); only then is the old table freed.  Readers never block
 * and never wait for the writer; the writer spins with sched_yield.  A slot
 * is 0 between sections, so a registered but idle reader (a worker parked
 * between batches, a Datapath never run, a thread that looked up once) never
 * holds a grace period up.  Keep sections short: the datapath enters one per
 * batch (dp_rx_frames), a Python lookup one per call.  Never call
 * lpm_rcu_sync inside a section (it would wait for itself: aborts), nor
 * take the GIL inside one (writers hold it while they wait).
 *
 * Slots come from a static pool, then from blocks allocated once and never
 * freed (so the writer walks them without a lock); a thread claims a free
 * one with one compare-and-swap.  After fork() the child's slots of the
 * threads that did not survive are given back (pthread_atfork).
 */
#include <pthread.h>
#include <stdio.h>

typedef struct lpm_reader {
    uint64_t active;            /* 0: outside; else the epoch at entry (written by its owner) */
    uint32_t nest;              /* section depth, owner only */
    uint32_t owned;             /* claimed by a live thread */
    struct lpm_reader *next;    /* allocated slots past the pool, never freed */
    char pad[64 - 2 * sizeof(uint64_t) - sizeof(void *)];
} __attribute__((aligned(64))) lpm_reader;

#define LPM_READER_POOL 64

static lpm_reader lpm_reader_pool[LPM_READER_POOL];
static lpm_reader *lpm_reader_more;             /* pushed on the front */
static unsigned lpm_reader_hwm;                 /* pool slots ever claimed: [0, hwm) */
static uint64_t lpm_gp_epoch __attribute__((aligned(64))) = 1;
static __thread lpm_reader *lpm_my_reader;
static pthread_key_t lpm_reader_key;
static pthread_once_t lpm_reader_once = PTHREAD_ONCE_INIT;

static void lpm_reader_release(void *p) {
    lpm_reader *r = (lpm_reader *)p;
    r->nest = 0;
    __atomic_store_n(&r->active, 0, __ATOMIC_RELEASE);   /* a dead thread reads nothing */
    __atomic_store_n(&r->owned, 0, __ATOMIC_RELEASE);
}

static void lpm_reader_atfork_child(void) {
    /* only the forking thread lives on in the child */
    lpm_reader *r;
    unsigned i;
    for (i = 0; i < LPM_READER_POOL; i++)
        if (&lpm_reader_pool[i] != lpm_my_reader) lpm_reader_release(&lpm_reader_pool[i]);
    for (r = lpm_reader_more; r; r = r->next)
        if (r != lpm_my_reader) lpm_reader_release(r);
}

static void lpm_reader_init(void) {
    (void)pthread_key_create(&lpm_reader_key, lpm_reader_release);
    (void)pthread_atfork(NULL, NULL, lpm_reader_atfork_child);
}

static int lpm_reader_try(lpm_reader *r) {
    uint32_t z = 0;
    return __atomic_load_n(&r->owned, __ATOMIC_RELAXED) == 0 &&
           __atomic_compare_exchange_n(&r->owned, &z, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}

/* The calling thread's slot (claimed on its first section; never NULL). */
static __attribute__((noinline)) lpm_reader *lpm_reader_claim(void) {
    lpm_reader *r = NULL, *head;
    unsigned i, h;
    (void)pthread_once(&lpm_reader_once, lpm_reader_init);
    for (;;) {
        for (i = 0; i < LPM_READER_POOL && !r; i++)
            if (lpm_reader_try(&lpm_reader_pool[i])) r = &lpm_reader_pool[i];
        if (r) {
            h = __atomic_load_n(&lpm_reader_hwm, __ATOMIC_RELAXED);
            while (h < i && !__atomic_compare_exchange_n(&lpm_reader_hwm, &h, i, 1,
                                                         __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {}
            break;
        }
        for (r = __atomic_load_n(&lpm_reader_more, __ATOMIC_ACQUIRE); r; r = r->next)
            if (lpm_reader_try(r)) break;
        if (r) break;
        if (posix_memalign((void **)&r, 64, sizeof(lpm_reader)) == 0) {
            memset(r, 0, sizeof(*r));
            r->owned = 1;
            head = __atomic_load_n(&lpm_reader_more, __ATOMIC_RELAXED);
            do r->next = head;
            while (!__atomic_compare_exchange_n(&lpm_reader_more, &head, r, 1,
                                                __ATOMIC_RELEASE, __ATOMIC_RELAXED));
            break;
        }
        /* out of memory with every slot taken: wait for a thread to exit */
        r = NULL;
        sched_yield();
    }
    lpm_my_reader = r;
    (void)pthread_setspecific(lpm_reader_key, r);
    return r;
}

static inline void lpm_rcu_read_lock(void) {
    lpm_reader *r = lpm_my_reader;
    if (__builtin_expect(r == NULL, 0)) r = lpm_reader_claim();
    if (r->nest++ == 0) {
        __atomic_store_n(&r->active, __atomic_load_n(&lpm_gp_epoch, __ATOMIC_ACQUIRE), __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);    /* the slot's store before the section's loads */
    }
}

static inline void lpm_rcu_read_unlock(void) {
    lpm_reader *r = lpm_my_reader;
    if (--r->nest == 0) __atomic_store_n(&r->active, 0, __ATOMIC_RELEASE);
}

/* 1 when the calling thread is inside a read section. */
static inline int lpm_rcu_reading(void) {
    return lpm_my_reader != NULL && lpm_my_reader->nest > 0;
}

/* The calling thread's slot (NULL before its first section). */
static inline const void *lpm_rcu_my_slot(void) {
    return lpm_my_reader;
}

/* Lookups that rely on the caller's section check it in checked builds
 * (EGRESSCORE_CHECKED=1; includes/byteorder.h defines it 0 otherwise, so
 * test its value, not whether it is defined). */
#if defined(EGRESSCORE_CHECKED) && EGRESSCORE_CHECKED
#define LPM_RCU_ASSERT_READING() do { if (!lpm_rcu_reading()) { \
    fprintf(stderr, "egresscore: %s outside an RCU read section\n", __func__); abort(); } } while (0)
#else
#define LPM_RCU_ASSERT_READING() do { } while (0)
#endif

static inline void lpm_rcu_assert_reading(void) {
    LPM_RCU_ASSERT_READING();
}

/* Slots inside a section now (every thread): 0 whenever no reader is in
 * one; a section left entered would keep it above 0 and lpm_rcu_sync
 * waiting. */
static uint64_t lpm_rcu_readers(void) {
    uint64_t n = 0;
    unsigned i, h = __atomic_load_n(&lpm_reader_hwm, __ATOMIC_ACQUIRE);
    lpm_reader *r;
    for (i = 0; i < h; i++) n += __atomic_load_n(&lpm_reader_pool[i].active, __ATOMIC_SEQ_CST) != 0;
    for (r = __atomic_load_n(&lpm_reader_more, __ATOMIC_ACQUIRE); r; r = r->next)
        n += __atomic_load_n(&r->active, __ATOMIC_SEQ_CST) != 0;
    return n;
}

/* Slots claimed by live threads, and slots that exist (pool slots ever
 * used plus allocated ones): the registry does not grow with threads that
 * came and went. */
static void lpm_rcu_slots(uint64_t *owned, uint64_t *total) {
    unsigned i, h = __atomic_load_n(&lpm_reader_hwm, __ATOMIC_ACQUIRE);
    lpm_reader *r;
    *owned = 0;
    *total = h;
    for (i = 0; i < h; i++) *owned += __atomic_load_n(&lpm_reader_pool[i].owned, __ATOMIC_ACQUIRE);
    for (r = __atomic_load_n(&lpm_reader_more, __ATOMIC_ACQUIRE); r; r = r->next) {
        *owned += __atomic_load_n(&r->owned, __ATOMIC_ACQUIRE);
        (*total)++;
    }
}

static void lpm_rcu_wait_slot(lpm_reader *r, uint64_t target) {
    uint64_t a;
    if (r == lpm_my_reader && r->nest) {
        fprintf(stderr, "egresscore: lpm_rcu_sync inside a read section (it would wait for itself)\n");
        abort();
    }
    while ((a = __atomic_load_n(&r->active, __ATOMIC_ACQUIRE)) != 0 && a < target)
        sched_yield();
}

/* Wait for a grace period: every section that may have loaded a pointer
 * published before this call has ended.  Call after the publishing store,
 * free what it replaced after this returns. */
static void lpm_rcu_sync(void) {
    unsigned i, h;
    lpm_reader *r;
    /* after the publish, before reading any slot (pairs with the readers'
     * fence: a reader whose slot still reads 0 here loads the new pointer) */
    uint64_t target = __atomic_add_fetch(&lpm_gp_epoch, 1, __ATOMIC_SEQ_CST);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    h = __atomic_load_n(&lpm_reader_hwm, __ATOMIC_ACQUIRE);
    for (i = 0; i < h; i++) lpm_rcu_wait_slot(&lpm_reader_pool[i], target);
    for (r = __atomic_load_n(&lpm_reader_more, __ATOMIC_ACQUIRE); r; r = r->next)
        lpm_rcu_wait_slot(r, target);
}

/* ---- lookups -------------------------------------------------------------- */

static inline unsigned lpm_win(uint64_t hi, uint64_t lo, unsigned off) {
    if (off <= 58) return (unsigned)(hi >> (58 - off)) & 63;
    if (off < 64) return (unsigned)((hi << (off - 58)) | (lo >> (122 - off))) & 63;
    if (off <= 122) return (unsigned)(lo >> (122 - off)) & 63;
    return (unsigned)(lo << (off - 122)) & 63;
}

/* nb (1..60) key bits from bit `off`, never straddling the two halves. */
static inline uint64_t lpm_bits(uint64_t hi, uint64_t lo, unsigned off, unsigned nb) {
    uint64_t w = off < 64 ? hi << off : lo << (off - 64);
    return w >> (64 - nb);
}

static inline uint64_t lpm_rank_mask(unsigned v) {
    return (2ULL << v) - 1;   /* v == 63: 2 << 63 wraps to 0, all ones */
}

/* Longest-prefix match of a host-order IPv4 address; LPM_NONE if none. */
static inline uint32_t lpm4_table_lookup(const lpm_table *t, uint32_t a) {
    uint32_t d = t->direct[a >> (32 - t->dbits)];
    if (!(d & LPM_NODE)) return d;
    const lpm_node *n = &t->nodes[d & ~LPM_NODE];
    uint64_t k = (uint64_t)a << 32;
    unsigned off = t->dbits;
    for (;;) {
        unsigned v = (unsigned)(k >> (58 - off)) & 63;
        uint64_t m = lpm_rank_mask(v);
        if ((n->vector >> v) & 1) {
            n = &t->nodes[n->base1 + __builtin_popcountll(n->vector & m) - 1];
            off += 6;
        } else {
            return t->leaves[n->base0 + __builtin_popcountll(n->leafvec & m) - 1];
        }
    }
}

/* IPv6: hi/lo are the address's two host-order 64-bit halves.  dbits is
 * 10 or 16, so no stride straddles the halves except via lpm_win. */
static inline uint32_t lpm6_table_lookup(const lpm_table *t, uint64_t hi, uint64_t lo) {
    uint32_t d = t->direct[hi >> (64 - t->dbits)];
    if (!(d & LPM_NODE)) return d;
    const lpm_node *n = &t->nodes[d & ~LPM_NODE];
    unsigned off = t->dbits;
    for (;;) {
        if (n->base1 & LPM_SKIP) {
            /* A chain of single-child nodes folded into one: compare the
             * key's next 6k bits; a mismatch lands on the chain's leaves. */
            unsigned nb = (unsigned)(n->leafvec >> 32);
            int match = lpm_bits(hi, lo, off, nb) == n->vector;
            if (n->base1 & LPM_TERM) return match ? n->base0 : (uint32_t)n->leafvec;
            if (!match) return (uint32_t)n->leafvec;
            off += nb;
            n = &t->nodes[n->base1 & ~LPM_SKIP];
            continue;
        }
        unsigned v = lpm_win(hi, lo, off);
        uint64_t m = lpm_rank_mask(v);
        if ((n->vector >> v) & 1) {
            n = &t->nodes[n->base1 + __builtin_popcountll(n->vector & m) - 1];
            off += 6;
        } else {
            return t->leaves[n->base0 + __builtin_popcountll(n->leafvec & m) - 1];
        }
    }
}

/* Batch lookups walk a group of LPM_GROUP keys level by level: each pass
 * issues one independent load per unfinished key, so the cache misses of a
 * whole group overlap instead of queueing behind each other (the same idea
 * as DPDK's lookup_bulk / poptrie's batched walk). */
#define LPM_GROUP 16

static void lpm4_table_lookup_batch(const lpm_table *t, const uint32_t *keys, size_t n,
                                    uint32_t *out, uint8_t *found) {
    const unsigned shift = 32 - t->dbits;
    const uint32_t *direct = t->direct;
    const lpm_node *nodes = t->nodes;
    const uint32_t *leaves = t->leaves;
    size_t i = 0;
    for (; i < n; i += LPM_GROUP) {
        size_t g = n - i < LPM_GROUP ? n - i : LPM_GROUP, j;
        const lpm_node *cur[LPM_GROUP];
        unsigned pending[LPM_GROUP], np = 0;
        if (i + 2 * LPM_GROUP <= n)
            for (j = 0; j < LPM_GROUP; j++) __builtin_prefetch(&direct[keys[i + LPM_GROUP + j] >> shift]);
        for (j = 0; j < g; j++) {
            uint32_t d = direct[keys[i + j] >> shift];
            if (d & LPM_NODE) {
                cur[j] = &nodes[d & ~LPM_NODE];
                __builtin_prefetch(cur[j]);
                pending[np++] = (unsigned)j;
            } else {
                out[i + j] = d;
            }
        }
        unsigned off = t->dbits;
        while (np) {
            unsigned still = 0, p;
            for (p = 0; p < np; p++) {
                unsigned j2 = pending[p];
                const lpm_node *nd = cur[j2];
                unsigned v = (unsigned)(((uint64_t)keys[i + j2] << 32) >> (58 - off)) & 63;
                uint64_t m = lpm_rank_mask(v);
                if ((nd->vector >> v) & 1) {
                    cur[j2] = &nodes[nd->base1 + __builtin_popcountll(nd->vector & m) - 1];
                    __builtin_prefetch(cur[j2]);
                    pending[still++] = j2;
                } else {
                    out[i + j2] = leaves[nd->base0 + __builtin_popcountll(nd->leafvec & m) - 1];
                }
            }
            np = still;
            off += 6;
        }
        for (j = 0; j < g; j++) found[i + j] = out[i + j] != LPM_NONE;
    }
}

/* keys: n pairs of host-order uint64 (hi, lo) when `bytes` is 0, else n
 * 16-byte network-order addresses. */
static void lpm6_table_lookup_batch(const lpm_table *t, const void *keys, int bytes, size_t n,
                                    uint32_t *out, uint8_t *found) {
    const uint64_t *k64 = (const uint64_t *)keys;
    const uint8_t *k8 = (const uint8_t *)keys;
    const unsigned shift = 64 - t->dbits;
    const uint32_t *direct = t->direct;
    const lpm_node *nodes = t->nodes;
    const uint32_t *leaves = t->leaves;
    size_t i = 0;
    for (; i < n; i += LPM_GROUP) {
        size_t g = n - i < LPM_GROUP ? n - i : LPM_GROUP, j;
        uint64_t hi[LPM_GROUP], lo[LPM_GROUP];
        const lpm_node *cur[LPM_GROUP];
        unsigned off[LPM_GROUP];
        unsigned pending[LPM_GROUP], np = 0;
        for (j = 0; j < g; j++) {
            if (bytes) { hi[j] = be_load64(k8 + 16 * (i + j)); lo[j] = be_load64(k8 + 16 * (i + j) + 8); }
            else { hi[j] = k64[2 * (i + j)]; lo[j] = k64[2 * (i + j) + 1]; }
            __builtin_prefetch(&direct[hi[j] >> shift]);
        }
        for (j = 0; j < g; j++) {
            uint32_t d = direct[hi[j] >> shift];
            if (d & LPM_NODE) {
                cur[j] = &nodes[d & ~LPM_NODE];
                off[j] = t->dbits;
                __builtin_prefetch(cur[j]);
                pending[np++] = (unsigned)j;
            } else {
                out[i + j] = d;
            }
        }
        while (np) {
            unsigned still = 0, p;
            for (p = 0; p < np; p++) {
                unsigned j2 = pending[p];
                const lpm_node *nd = cur[j2];
                if (nd->base1 & LPM_SKIP) {
                    unsigned nb = (unsigned)(nd->leafvec >> 32);
                    int match = lpm_bits(hi[j2], lo[j2], off[j2], nb) == nd->vector;
                    if (nd->base1 & LPM_TERM) {
                        out[i + j2] = match ? nd->base0 : (uint32_t)nd->leafvec;
                    } else if (!match) {
                        out[i + j2] = (uint32_t)nd->leafvec;
                    } else {
                        off[j2] += nb;
                        cur[j2] = &nodes[nd->base1 & ~LPM_SKIP];
                        __builtin_prefetch(cur[j2]);
                        pending[still++] = j2;
                    }
                    continue;
                }
                unsigned v = lpm_win(hi[j2], lo[j2], off[j2]);
                uint64_t m = lpm_rank_mask(v);
                if ((nd->vector >> v) & 1) {
                    cur[j2] = &nodes[nd->base1 + __builtin_popcountll(nd->vector & m) - 1];
                    off[j2] += 6;
                    __builtin_prefetch(cur[j2]);
                    pending[still++] = j2;
                } else {
                    out[i + j2] = leaves[nd->base0 + __builtin_popcountll(nd->leafvec & m) - 1];
                }
            }
            np = still;
        }
        for (j = 0; j < g; j++) found[i + j] = out[i + j] != LPM_NONE;
    }
}

/* ---- building ------------------------------------------------------------- */

/* The table's three arrays come from egc_alloc_big (includes/alloc.h), huge
 * pages advised: random lookups into a table of tens of MB otherwise spend
 * most of their time in TLB misses.  lpm_table_free gives them back with the
 * sizes they were allocated with (direct: 1 << dbits, nodes and leaves: their
 * capacities). */

typedef struct {
    lpm_node *nodes;
    uint32_t nn, ncap;
    uint32_t *leaves;
    uint32_t nl, lcap;
    const lpm_entry *e;
    int oom;
    int fixed;          /* patching a published table: never realloc */
    int skip;           /* fold single-child chains (IPv6 tables) */
} lpm_builder;

static uint32_t lpm_reserve_nodes(lpm_builder *b, uint32_t k) {
    uint32_t at = b->nn;
    if (b->nn + k > b->ncap) {
        if (b->fixed) { b->oom = 1; return 0; }
        uint32_t cap = b->ncap ? b->ncap : 64;
        while (cap < b->nn + k) cap *= 2;
        lpm_node *p = (lpm_node *)realloc(b->nodes, (size_t)cap * sizeof(lpm_node));
        if (!p) { b->oom = 1; return 0; }
        b->nodes = p;
        b->ncap = cap;
    }
    memset(&b->nodes[at], 0, (size_t)k * sizeof(lpm_node));
    b->nn += k;
    return at;
}

static void lpm_push_leaf(lpm_builder *b, uint32_t v) {
    if (b->nl == b->lcap) {
        if (b->fixed) { b->oom = 1; return; }
        uint32_t cap = b->lcap ? b->lcap * 2 : 256;
        uint32_t *p = (uint32_t *)realloc(b->leaves, (size_t)cap * sizeof(uint32_t));
        if (!p) { b->oom = 1; return; }
        b->leaves = p;
        b->lcap = cap;
    }
    b->leaves[b->nl++] = v;
}

/* Build node `idx` covering bits [off, off+6) for entries e[i..j), which all
 * lie inside the node's block with len > off, sorted by (key, len).  def is
 * the leaf-pushed value of the longest prefix covering the whole block. */
static void lpm_build_node(lpm_builder *b, uint32_t idx, size_t i, size_t j,
                           unsigned off, uint32_t def) {
    uint32_t sd[64];
    uint64_t vector = 0, leafvec = 0;
    unsigned s, t;
    size_t k;
    const lpm_entry *e = b->e;
    if (b->skip) {
        /* Path compression: while every entry lies below one slot of the
         * next stride and none ends inside it, the node would have one
         * child and 63 leaves of `def`; fold up to 10 such strides (never
         * across the 64-bit halves) into one skip node. */
        unsigned minlen = 255, nb = 0, o = off;
        if (j - i == 1 && e[i].len - off <= 60 && (off >= 64 || e[i].len <= 64)) {
            /* One prefix below: compare its remaining bits, no leaves. */
            nb = e[i].len - off;
            b->nodes[idx].vector = lpm_bits(e[i].hi, e[i].lo, off, nb);
            b->nodes[idx].leafvec = (uint64_t)def | ((uint64_t)nb << 32);
            b->nodes[idx].base0 = e[i].val;
            b->nodes[idx].base1 = LPM_SKIP | LPM_TERM;
            return;
        }
        for (k = i; k < j; k++) if (e[k].len < minlen) minlen = e[k].len;
        while (nb < 60 && (off < 64 ? o + 6 <= 64 : o + 6 <= 128) && minlen > o + 6
               && lpm_win(e[i].hi, e[i].lo, o) == lpm_win(e[j - 1].hi, e[j - 1].lo, o)) {
            nb += 6;
            o += 6;
        }
        if (nb >= 12) {
            uint32_t child = lpm_reserve_nodes(b, 1);
            if (b->oom) return;
            b->nodes[idx].vector = lpm_bits(e[i].hi, e[i].lo, off, nb);
            b->nodes[idx].leafvec = (uint64_t)def | ((uint64_t)nb << 32);
            b->nodes[idx].base0 = 0;
            b->nodes[idx].base1 = LPM_SKIP | child;
            lpm_build_node(b, child, i, j, off + nb, def);
            return;
        }
    }
    for (s = 0; s < 64; s++) sd[s] = def;
    /* Sorted order paints covering prefixes before the ones they cover. */
    for (k = i; k < j; k++) {
        unsigned l = e[k].len;
        s = lpm_win(e[k].hi, e[k].lo, off);
        if (l <= off + 6) {
            unsigned span = 1u << (off + 6 - l);
            for (t = s; t < s + span && t < 64; t++) sd[t] = e[k].val;
        } else {
            vector |= 1ULL << s;
        }
    }
    uint32_t base0 = b->nl;
    int have = 0;
    uint32_t prev = 0;
    for (s = 0; s < 64; s++) {
        if ((vector >> s) & 1) continue;
        if (!have || sd[s] != prev) {
            lpm_push_leaf(b, sd[s]);
            leafvec |= 1ULL << s;
            prev = sd[s];
            have = 1;
        }
    }
    uint32_t nchild = (uint32_t)__builtin_popcountll(vector);
    uint32_t base1 = nchild ? lpm_reserve_nodes(b, nchild) : 0;
    if (b->oom) return;
    b->nodes[idx].vector = vector;
    b->nodes[idx].leafvec = leafvec;
    b->nodes[idx].base0 = base0;
    b->nodes[idx].base1 = base1;
    uint32_t c = 0;
    k = i;
    while (k < j) {
        if (e[k].len <= off + 6) { k++; continue; }
        s = lpm_win(e[k].hi, e[k].lo, off);
        size_t cj = k + 1;
        while (cj < j && lpm_win(e[cj].hi, e[cj].lo, off) == s) cj++;
        lpm_build_node(b, base1 + c, k, cj, off + 6, sd[s]);
        if (b->oom) return;
        c++;
        k = cj;
    }
}

static void lpm_table_free(lpm_table *t) {
    if (!t) return;
    egc_free_big(t->direct, ((size_t)1 << t->dbits) * sizeof(uint32_t));
    egc_free_big(t->nodes, (size_t)t->cap_nodes * sizeof(lpm_node));
    egc_free_big(t->leaves, (size_t)t->cap_leaves * sizeof(uint32_t));
    free(t->aux);
    free(t);
}

static size_t lpm_table_bytes(const lpm_table *t) {
    if (!t) return 0;
    return sizeof(lpm_table) + ((size_t)1 << t->dbits) * 4 + (size_t)t->cap_nodes * sizeof(lpm_node)
        + (size_t)t->cap_leaves * 4 + t->aux_bytes;
}

/* Direct-array bits for n prefixes: small tables stay small (1 KB for
 * IPv4), big ones get 2^18 (IPv4) or 2^16 (IPv6) entries. */
static unsigned lpm_ideal_dbits(size_t n, unsigned width) {
    if (width == 32) {
        unsigned bl = 0, dbits;
        while (((size_t)1 << bl) <= n) bl++;
        dbits = bl + 2;
        if (dbits < 8) dbits = 8;
        if (dbits > 18) dbits = 18;
        return dbits;
    }
    return n >= 4096 ? 16 : 10;   /* 16 + 6k and 10 + 6k hit 64 exactly */
}

/* Build a table from n entries sorted by (hi, lo, len), unique, host bits
 * clear.  width is 32 or 128.  slack: keep spare node/leaf room (1/8 + 256)
 * for in-place patches.  Returns NULL when out of memory. */
static lpm_table *lpm_table_build_slack(const lpm_entry *e, size_t n, unsigned width, int slack) {
    unsigned dbits = lpm_ideal_dbits(n, width);
    lpm_table *t = (lpm_table *)calloc(1, sizeof(lpm_table));
    if (!t) return NULL;
    t->dbits = dbits;
    size_t nd = (size_t)1 << dbits;
    t->direct = (uint32_t *)egc_alloc_big(nd * sizeof(uint32_t), 1);
    if (!t->direct) { free(t); return NULL; }
    size_t k, s;
    for (s = 0; s < nd; s++) t->direct[s] = LPM_NONE;
    for (k = 0; k < n; k++) {
        if (e[k].len > dbits) continue;
        s = (size_t)(e[k].hi >> (64 - dbits));
        size_t span = (size_t)1 << (dbits - e[k].len);
        if (e[k].len == 0) s = 0;
        for (size_t u = s; u < s + span; u++) t->direct[u] = e[k].val;
    }
    lpm_builder b;
    memset(&b, 0, sizeof(b));
    b.e = e;
    b.skip = width == 128;
    k = 0;
    while (k < n) {
        if (e[k].len <= dbits) { k++; continue; }
        s = (size_t)(e[k].hi >> (64 - dbits));
        size_t cj = k + 1;
        while (cj < n && (size_t)(e[cj].hi >> (64 - dbits)) == s) cj++;
        uint32_t idx = lpm_reserve_nodes(&b, 1);
        if (b.oom) break;
        lpm_build_node(&b, idx, k, cj, dbits, t->direct[s]);
        if (b.oom) break;
        t->direct[s] = LPM_NODE | idx;
        k = cj;
    }
    if (b.oom) {
        free(b.nodes);
        free(b.leaves);
        egc_free_big(t->direct, nd * sizeof(uint32_t));
        free(t);
        return NULL;
    }
    /* Size to fit (plus patch room): the builder's doubling slack would
     * otherwise cost up to 2x. */
    uint32_t want_n = b.nn + (slack ? b.nn / 16 + 256 : 0);
    uint32_t want_l = b.nl + (slack ? b.nl / 16 + 1024 : 0);
    {
        /* the builder's arrays (realloc'd) are copied into the table's own */
        lpm_node *p = (lpm_node *)egc_alloc_big((size_t)want_n * sizeof(lpm_node), 1);
        uint32_t *q = (uint32_t *)egc_alloc_big((size_t)want_l * sizeof(uint32_t), 1);
        if (!p || !q) {
            egc_free_big(p, (size_t)want_n * sizeof(lpm_node));
            egc_free_big(q, (size_t)want_l * sizeof(uint32_t));
            free(b.nodes);
            free(b.leaves);
            egc_free_big(t->direct, nd * sizeof(uint32_t));
            free(t);
            return NULL;
        }
        if (b.nn) memcpy(p, b.nodes, (size_t)b.nn * sizeof(lpm_node));
        if (b.nl) memcpy(q, b.leaves, (size_t)b.nl * sizeof(uint32_t));
        free(b.nodes);
        free(b.leaves);
        b.nodes = p;
        b.ncap = want_n;
        b.leaves = q;
        b.lcap = want_l;
    }
    t->nodes = b.nodes;
    t->leaves = b.leaves;
    t->n_nodes = b.nn;
    t->n_leaves = b.nl;
    t->cap_nodes = b.ncap;
    t->cap_leaves = b.lcap;
    return t;
}

static lpm_table *lpm_table_build(const lpm_entry *e, size_t n, unsigned width) {
    return lpm_table_build_slack(e, n, width, 0);
}

/* ---- the sorted prefix store (the source of truth) ------------------------ */

static inline int lpm_entry_cmp(const lpm_entry *a, const lpm_entry *b) {
    if (a->hi != b->hi) return a->hi < b->hi ? -1 : 1;
    if (a->lo != b->lo) return a->lo < b->lo ? -1 : 1;
    if (a->len != b->len) return a->len < b->len ? -1 : 1;
    return 0;
}

/* Index of the first entry >= key. */
static size_t lpm_entries_lower(const lpm_entry *e, size_t n, const lpm_entry *key) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (lpm_entry_cmp(&e[mid], key) < 0) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

typedef struct {
    lpm_entry ent;
    size_t seq;
} lpm_seq_entry;

static int lpm_seq_cmp(const void *pa, const void *pb) {
    const lpm_seq_entry *a = (const lpm_seq_entry *)pa, *b = (const lpm_seq_entry *)pb;
    int c = lpm_entry_cmp(&a->ent, &b->ent);
    if (c) return c;
    return a->seq < b->seq ? -1 : (a->seq > b->seq ? 1 : 0);
}

/* Merge m new entries (any order, later duplicates win) into the sorted
 * array old[0..n); returns a fresh malloc'd array and its length, or NULL. */
static lpm_entry *lpm_entries_merge(const lpm_entry *old, size_t n, lpm_seq_entry *add, size_t m,
                                    size_t *out_n) {
    size_t i, j, k, w;
    qsort(add, m, sizeof(lpm_seq_entry), lpm_seq_cmp);
    /* dedupe: keep the last of each run of equal keys */
    w = 0;
    for (i = 0; i < m; i++) {
        if (i + 1 < m && lpm_entry_cmp(&add[i].ent, &add[i + 1].ent) == 0) continue;
        add[w++] = add[i];
    }
    m = w;
    lpm_entry *out = (lpm_entry *)malloc((n + m + 1) * sizeof(lpm_entry));
    if (!out) return NULL;
    i = j = k = 0;
    while (i < n || j < m) {
        if (j == m) out[k++] = old[i++];
        else if (i == n) out[k++] = add[j++].ent;
        else {
            int c = lpm_entry_cmp(&old[i], &add[j].ent);
            if (c < 0) out[k++] = old[i++];
            else if (c > 0) out[k++] = add[j++].ent;
            else { out[k++] = add[j++].ent; i++; }
        }
    }
    *out_n = k;
    return out;
}

/* ---- a trie: the prefix store plus its published table -------------------- */

typedef struct {
    lpm_table *cur;      /* published; read with __atomic_load_n ACQUIRE */
    lpm_entry *e;
    size_t n, cap;
    unsigned width;      /* 32 or 128 */
} lpm_trie;

static inline const lpm_table *lpm_trie_table(lpm_trie *t) {
    return __atomic_load_n(&t->cur, __ATOMIC_ACQUIRE);
}

/* Rebuild the table from the store and publish it; 0 or -1 (out of memory,
 * the old table stays published). */
static int lpm_trie_publish(lpm_trie *t) {
    lpm_table *nt = lpm_table_build_slack(t->e, t->n, t->width, 1);
    if (!nt) return -1;
    lpm_table *old = t->cur;
    __atomic_store_n(&t->cur, nt, __ATOMIC_SEQ_CST);
    if (old) {
        lpm_rcu_sync();
        lpm_table_free(old);
    }
#ifdef LPM_HAVE_MALLOC_TRIM
    /* A big build leaves tens of MB of scratch in the heap's free lists:
     * hand it back to the OS so the table's RSS is what it uses. */
    if (t->n >= 65536) malloc_trim(0);
#endif
    return 0;
}


/* ---- in-place patches: rebuild one direct slot's subtree ------------------
 * The new subtree is written into the unused tail of the published table's
 * node and leaf arrays (readers never look there), then one atomic 32-bit
 * store of the direct entry publishes it.  A lookup sees the slot's old
 * subtree or its new one, never a mix; old nodes become garbage that the
 * next full rebuild (when the tail runs out) drops.  Nothing a reader may
 * hold is ever freed or rewritten, so no grace period is needed.
 */
static long lpm_trie_find(const lpm_trie *t, const lpm_entry *key);

/* Longest stored prefix of length <= maxlen covering key (hi, lo). */
static uint32_t lpm_trie_cover(const lpm_trie *t, uint64_t hi, int maxlen) {
    int l;
    for (l = maxlen; l >= 0; l--) {
        lpm_entry k;
        k.hi = l ? hi & ~(~0ULL >> l) : 0;
        k.lo = 0;
        k.len = (uint32_t)l;
        k.val = 0;
        long i = lpm_trie_find(t, &k);
        if (i >= 0) return t->e[i].val;
    }
    return LPM_NONE;
}

/* Rebuild direct slot u whose leaf-pushed default is def. */
static int lpm_patch_slot(lpm_trie *t, lpm_table *tb, size_t u, uint32_t def) {
    unsigned dbits = tb->dbits;
    lpm_entry first;
    first.hi = (uint64_t)u << (64 - dbits); first.lo = 0; first.len = dbits + 1; first.val = 0;
    size_t i = lpm_entries_lower(t->e, t->n, &first), j = i;
    while (j < t->n && (size_t)(t->e[j].hi >> (64 - dbits)) == u) j++;
    if (i == j) {
        __atomic_store_n(&tb->direct[u], def, __ATOMIC_RELEASE);
        return 0;
    }
    lpm_builder b;
    memset(&b, 0, sizeof(b));
    b.e = t->e;
    b.fixed = 1;
    b.skip = t->width == 128;
    b.nodes = tb->nodes; b.nn = tb->n_nodes; b.ncap = tb->cap_nodes;
    b.leaves = tb->leaves; b.nl = tb->n_leaves; b.lcap = tb->cap_leaves;
    uint32_t idx = lpm_reserve_nodes(&b, 1);
    if (!b.oom) lpm_build_node(&b, idx, i, j, dbits, def);
    if (b.oom) return -1;
    tb->n_nodes = b.nn;
    tb->n_leaves = b.nl;
    __atomic_store_n(&tb->direct[u], LPM_NODE | idx, __ATOMIC_RELEASE);
    return 0;
}

/* Apply a change of prefix `key` (already made in the store) to the
 * published table in place; -1 when a full rebuild is needed instead.
 * A prefix longer than dbits touches one slot; a shorter one (down to
 * dbits - 14) repaints the defaults of its slots and rebuilds their
 * subtrees, each slot published by its own atomic store. */
static int lpm_trie_patch(lpm_trie *t, const lpm_entry *key) {
    lpm_table *tb = t->cur;
    if (!tb || lpm_ideal_dbits(t->n, t->width) != tb->dbits) return -1;
    unsigned dbits = tb->dbits, L = key->len;
    size_t s0 = L ? (size_t)(key->hi >> (64 - dbits)) : 0;
    if (L > dbits) {
        return lpm_patch_slot(t, tb, s0, lpm_trie_cover(t, key->hi, (int)dbits));
    }
    if (dbits - L > 14) return -1;
    size_t span = (size_t)1 << (dbits - L), u, k;
    uint32_t *defs = (uint32_t *)malloc(span * sizeof(uint32_t));
    if (!defs) return -1;
    uint32_t anc = lpm_trie_cover(t, key->hi, (int)L);
    for (u = 0; u < span; u++) defs[u] = anc;
    lpm_entry first = *key;
    first.len = L + 1;
    for (k = lpm_entries_lower(t->e, t->n, &first); k < t->n; k++) {
        size_t s = (size_t)(t->e[k].hi >> (64 - dbits));
        if (s < s0 || s >= s0 + span) break;
        if (t->e[k].len > dbits) continue;
        size_t w = (size_t)1 << (dbits - t->e[k].len);
        for (u = s; u < s + w; u++) defs[u - s0] = t->e[k].val;
    }
    for (u = 0; u < span; u++) {
        if (lpm_patch_slot(t, tb, s0 + u, defs[u]) < 0) { free(defs); return -1; }
    }
    free(defs);
    return 0;
}

static int lpm_trie_apply(lpm_trie *t, const lpm_entry *key) {
    if (lpm_trie_patch(t, key) == 0) return 0;
    return lpm_trie_publish(t);
}

/* Insert or replace; returns 1 if inserted, 0 if replaced, -1 on OOM. */
static int lpm_trie_store(lpm_trie *t, const lpm_entry *key) {
    size_t i = lpm_entries_lower(t->e, t->n, key);
    if (i < t->n && lpm_entry_cmp(&t->e[i], key) == 0) {
        uint32_t oldv = t->e[i].val;
        t->e[i].val = key->val;
        if (oldv == key->val) return 0;
        if (lpm_trie_apply(t, key) < 0) { t->e[i].val = oldv; return -1; }
        return 0;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        lpm_entry *p = (lpm_entry *)realloc(t->e, cap * sizeof(lpm_entry));
        if (!p) return -1;
        t->e = p;
        t->cap = cap;
    }
    memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof(lpm_entry));
    t->e[i] = *key;
    t->n++;
    if (lpm_trie_apply(t, key) < 0) {
        memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof(lpm_entry));
        t->n--;
        return -1;
    }
    return 1;
}

/* Delete; returns 1 if deleted, 0 if absent, -1 on OOM (nothing changed). */
static int lpm_trie_delete(lpm_trie *t, const lpm_entry *key) {
    size_t i = lpm_entries_lower(t->e, t->n, key);
    if (i >= t->n || lpm_entry_cmp(&t->e[i], key) != 0) return 0;
    lpm_entry saved = t->e[i];
    memmove(&t->e[i], &t->e[i + 1], (t->n - i - 1) * sizeof(lpm_entry));
    t->n--;
    if (lpm_trie_apply(t, key) < 0) {
        memmove(&t->e[i + 1], &t->e[i], (t->n - i) * sizeof(lpm_entry));
        t->e[i] = saved;
        t->n++;
        return -1;
    }
    return 1;
}

/* Exact get: index of the entry or -1. */
static long lpm_trie_find(const lpm_trie *t, const lpm_entry *key) {
    size_t i = lpm_entries_lower(t->e, t->n, key);
    if (i < t->n && lpm_entry_cmp(&t->e[i], key) == 0) return (long)i;
    return -1;
}

#ifdef LPM_POPCNT_PUSHED
#pragma GCC pop_options
#endif

#endif
