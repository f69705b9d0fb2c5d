/* Gateway pins: the gateway each connection from a local pod started on
 * (make-before-break).  A source node looks a packet's flow up here after the
 * egress map: a live pin wins over the map's choice, so a connection keeps
 * its gateway across a policy edit or a change of the gateway set; a flow
 * without one is pinned to the map's choice.
 *
 * Layout: open addressing, set-associative with two choices, no pointers,
 * no allocation after creation.  A bucket is one 64-byte cache line of
 * GWPIN_WAYS records; a flow lives in its home bucket, or in a second one
 * when home was full as it was pinned (about 2% of flows at 40% load), so a
 * bucket overflows only near full load.  A record is two 64-bit words:
 *
 *   k0 = source IPv4 | destination IPv4 << 32           (host order)
 *   k1 = bits  0-15  source port (ICMP echo: the id of a request)
 *        bits 16-31  destination port (ICMP echo reply: the id)
 *        bits 32-38  IP protocol (1, 6, 17; 0 marks an empty slot)
 *        bit  39     closing (TCP FIN or RST seen from the pod)
 *        bits 40-47  the gateway: the datapath's node index (0..255)
 *        bits 48-63  last seen, in ticks of 2^30 ns (1.07 s) modulo 2^16
 *
 * The full key (k0 and k1's bits 0-38) is compared, so a hash collision can
 * never hand one flow another's gateway.  A steady flow costs one hash, one
 * line (its home's, prefetched ahead by the batch loop) and no write: `seen`
 * is rewritten only when the coarse clock moved.
 * A record is live while its idle time in ticks is at most its timeout (the
 * NAT table's, by protocol and TCP state, in ticks rounded up and capped at
 * GWPIN_MAX_TICKS so ages never wrap: gwpin_sweep clears what expired long
 * before 2^16 ticks pass).  When both buckets are full, the record nearest
 * its expiry (an expired one first) is replaced, counted.  Single writer: the datapath's
 * thread. */
#ifndef EGRESSCORE_GWPIN_H
#define EGRESSCORE_GWPIN_H

#include <stdint.h>
#include <string.h>
#include "nat/nat_helpers.h"

#define GWPIN_WAYS 4
#define GWPIN_TICK_SHIFT 30
#define GWPIN_MAX_TICKS 32767u                 /* about 9.7 hours */
#define GWPIN_KEY_MASK 0x7fffffffffULL         /* k1 bits 0-38 */
#define GWPIN_CLOSING (1ULL << 39)
#define GWPIN_NODE_SHIFT 40
#define GWPIN_NODE_MASK (0xffULL << GWPIN_NODE_SHIFT)
#define GWPIN_SEEN_SHIFT 48
#define GWPIN_SEEN_MASK (0xffffULL << GWPIN_SEEN_SHIFT)
#define GWPIN_MAX_RECORDS (1u << 24)
#define GWPIN_PREFETCH_BYTES (256u << 10)     /* smaller tables stay in cache: no prefetch */

#define GWPIN_TCP_FIN 0x01
#define GWPIN_TCP_SYN 0x02
#define GWPIN_TCP_RST 0x04
#define GWPIN_TCP_ACK 0x10

typedef struct {
    uint64_t k0;
    uint64_t k1;
} gwpin_rec;

typedef struct {
    gwpin_rec r[GWPIN_WAYS];
} __attribute__((aligned(64))) gwpin_bucket;

typedef struct {
    gwpin_bucket *b;
    uint64_t mask;              /* buckets - 1 (a power of two) */
    uint64_t seed;
    uint32_t tmo[4];            /* ticks: TCP open, TCP closing, UDP, ICMP */
    uint32_t prefetch;          /* the table outgrows the caches: the batch loop prefetches buckets */
    uint64_t cursor;            /* gwpin_sweep's next bucket */
    uint64_t used;              /* records held (live or not yet swept) */
    /* counters */
    uint64_t pinned;            /* records made (a new flow, or a new connection on a closed one's tuple) */
    uint64_t kept;              /* packets sent to their pinned gateway while the map chose another */
    uint64_t kept_nat;          /* gateway: packets of connections translated here that the map no longer sends here */
    uint64_t repinned;          /* pins moved to the map's choice: their gateway was unusable */
    uint64_t expired;           /* records cleared or replaced after their timeout */
    uint64_t evicted;           /* live records pushed out of a full bucket */
    uint64_t flushed;           /* records dropped by gwpin_flush_node (a gateway down or gone) */
} gwpin_table;

static inline uint64_t gwpin_key0(uint32_t src, uint32_t dst)
{
    return (uint64_t)src | ((uint64_t)dst << 32);
}

static inline uint64_t gwpin_key1(uint8_t proto, uint16_t sport, uint16_t dport)
{
    return (uint64_t)sport | ((uint64_t)dport << 16) | ((uint64_t)(proto & 0x7f) << 32);
}

/* A flow's two buckets: its home h, where it is put while there is room,
 * and a second one, h2, when home is full (two choices: a bucket overflows
 * far later than with one). */
static inline uint64_t gwpin_hash(const gwpin_table *t, uint64_t k0, uint64_t k1)
{
    return nat_mum(k0 ^ t->seed ^ NAT_P0, k1 ^ NAT_P1);
}

static inline void gwpin_prefetch(const gwpin_table *t, uint64_t k0, uint64_t k1)
{
    nat_prefetch(&t->b[gwpin_hash(t, k0, k1) & t->mask]);
}

static inline uint32_t gwpin_tick(uint64_t now_ns)
{
    return (uint32_t)(now_ns >> GWPIN_TICK_SHIFT) & 0xffff;
}

/* Timeout (ticks) of record word k1. */
static inline uint32_t gwpin_tmo(const gwpin_table *t, uint64_t k1)
{
    uint32_t p = (uint32_t)(k1 >> 32) & 0x7f;
    if (p == 6)
        return (k1 & GWPIN_CLOSING) ? t->tmo[1] : t->tmo[0];
    return p == 17 ? t->tmo[2] : t->tmo[3];
}

/* Ticks record word k1 has been idle at `tick`. */
static inline uint32_t gwpin_age(uint64_t k1, uint32_t tick)
{
    return (tick - (uint32_t)(k1 >> GWPIN_SEEN_SHIFT)) & 0xffff;
}

static inline uint32_t gwpin_node(uint64_t k1)
{
    return (uint32_t)(k1 >> GWPIN_NODE_SHIFT) & 0xff;
}

static inline gwpin_rec *gwpin_find_in(gwpin_bucket *b, uint64_t k0, uint64_t k1)
{
    int i;
    for (i = 0; i < GWPIN_WAYS; i++)
        if (b->r[i].k0 == k0 && (b->r[i].k1 & GWPIN_KEY_MASK) == k1)
            return &b->r[i];
    return NULL;
}

/* The slot for a new pin in b: an empty one (*excess INT32_MAX), else the
 * record expired longest, else the one nearest its expiry (*excess: its idle
 * ticks beyond its timeout, > 0 expired); ties go round from way `start`, so
 * the pin just made is not the next one pushed out. */
static inline gwpin_rec *gwpin_victim_in(const gwpin_table *t, gwpin_bucket *b, uint32_t tick, uint32_t start,
                                         int32_t *excess)
{
    int32_t worst = INT32_MIN, x;
    uint32_t i, j, v = 0;
    for (i = 0; i < GWPIN_WAYS; i++) {
        j = (start + i) & (GWPIN_WAYS - 1);
        uint64_t w = b->r[j].k1;
        if (w == 0) {
            *excess = INT32_MAX;
            return &b->r[j];
        }
        x = (int32_t)gwpin_age(w, tick) - (int32_t)gwpin_tmo(t, w);
        if (x > worst) {
            worst = x;
            v = j;
        }
    }
    *excess = worst;
    return &b->r[v];
}

/* gwpin_pick's work beyond a steady flow's hit (r: its record in home
 * bucket b1, or NULL): the second bucket, a new pin, an idle pin refreshed
 * or a closed one re-pinned.  Out of line and cold, so that the inlined hit
 * stays small in the datapath's code and registers. */
__attribute__((noinline, cold))
static uint32_t gwpin_pick_rest(gwpin_table *t, uint64_t k0, uint64_t k1, uint8_t flags, uint64_t tick,
                                uint32_t node, gwpin_rec **rec, uint64_t h, gwpin_bucket *b1, gwpin_rec *r)
{
    uint64_t close = (flags & (GWPIN_TCP_FIN | GWPIN_TCP_RST)) ? GWPIN_CLOSING : 0;
    uint64_t w, nw;
    int32_t x1, x2;
    gwpin_bucket *b2;
    gwpin_rec *r2;
    if (r == NULL) {
        b2 = &t->b[(h >> 32) & t->mask];
        r = gwpin_find_in(b2, k0, k1);
        if (r == NULL) {
            /* no pin: home if it has room, else the second bucket if it
             * has, else the record of either nearest its expiry */
            r = gwpin_victim_in(t, b1, (uint32_t)tick, (uint32_t)t->pinned, &x1);
            if (x1 != INT32_MAX) {
                r2 = gwpin_victim_in(t, b2, (uint32_t)tick, (uint32_t)t->pinned, &x2);
                if (x2 > x1) {
                    r = r2;
                    x1 = x2;
                }
            }
            if (x1 == INT32_MAX)
                t->used++;
            else if (x1 > 0)
                t->expired++;
            else
                t->evicted++;
            t->pinned++;
            r->k0 = k0;
            r->k1 = k1 | ((uint64_t)node << GWPIN_NODE_SHIFT) | (tick << GWPIN_SEEN_SHIFT) | close;
            *rec = r;
            return node;
        }
    }
    *rec = r;
    w = r->k1;
    if ((w >> GWPIN_SEEN_SHIFT) == tick && !(flags & (GWPIN_TCP_FIN | GWPIN_TCP_RST | GWPIN_TCP_SYN)))
        return gwpin_node(w);
    if (gwpin_age(w, (uint32_t)tick) <= gwpin_tmo(t, w) &&
            !((w & GWPIN_CLOSING) && (flags & (GWPIN_TCP_SYN | GWPIN_TCP_ACK)) == GWPIN_TCP_SYN)) {
        nw = (w & ~GWPIN_SEEN_MASK) | (tick << GWPIN_SEEN_SHIFT) | close;
        if (nw != w)
            r->k1 = nw;
        return gwpin_node(w);
    }
    /* expired, or a new connection on a closed one's tuple: pinned anew */
    t->expired++;
    t->pinned++;
    r->k1 = k1 | ((uint64_t)node << GWPIN_NODE_SHIFT) | (tick << GWPIN_SEEN_SHIFT) | close;
    return node;
}

/* The gateway (node index) of flow (k0, k1) as of `now`: its pin's while
 * that is live, else `node` (the egress map's choice now), which becomes its
 * pin.  `flags`: the packet's TCP flags: FIN or RST close the pin (the
 * closing timeout); a SYN alone on a closed pin is a new connection on the
 * same tuple (re-pinned).  *rec gets the record (for gwpin_repin).  Inline:
 * a steady flow's hit in its home bucket (seen this tick already, no flag
 * that changes its state); the rest in gwpin_pick_rest. */
static inline uint32_t gwpin_pick(gwpin_table *t, uint64_t k0, uint64_t k1, uint8_t flags, uint64_t now,
                                  uint32_t node, gwpin_rec **rec)
{
    uint64_t h = gwpin_hash(t, k0, k1);
    gwpin_bucket *b1 = &t->b[h & t->mask];
    uint64_t tick = gwpin_tick(now);
    gwpin_rec *r = gwpin_find_in(b1, k0, k1);
    if (__builtin_expect(r != NULL && (r->k1 >> GWPIN_SEEN_SHIFT) == tick &&
                         !(flags & (GWPIN_TCP_FIN | GWPIN_TCP_RST | GWPIN_TCP_SYN)), 1)) {
        *rec = r;
        return gwpin_node(r->k1);
    }
    return gwpin_pick_rest(t, k0, k1, flags, tick, node, rec, h, b1, r);
}

/* Move a pin to `node` (its gateway cannot be used). */
static inline void gwpin_repin(gwpin_table *t, gwpin_rec *r, uint32_t node)
{
    r->k1 = (r->k1 & ~GWPIN_NODE_MASK) | ((uint64_t)node << GWPIN_NODE_SHIFT);
    t->repinned++;
}

/* Drop every pin on gateway `node`; returns how many. */
static inline uint64_t gwpin_flush_node(gwpin_table *t, uint32_t node)
{
    uint64_t i, n = 0;
    int j;
    for (i = 0; i <= t->mask; i++) {
        for (j = 0; j < GWPIN_WAYS; j++) {
            gwpin_rec *r = &t->b[i].r[j];
            if (r->k1 != 0 && gwpin_node(r->k1) == node) {
                r->k0 = r->k1 = 0;
                n++;
            }
        }
    }
    t->used -= n;
    t->flushed += n;
    return n;
}

/* Drop every pin; returns how many. */
static inline uint64_t gwpin_clear(gwpin_table *t)
{
    uint64_t n = t->used;
    memset(t->b, 0, (t->mask + 1) * sizeof(gwpin_bucket));
    t->used = 0;
    t->flushed += n;
    return n;
}

/* Clear the expired records of the next `buckets` buckets (bounded work, a
 * call every loop return); returns how many. */
static inline uint64_t gwpin_sweep(gwpin_table *t, uint64_t now, uint64_t buckets)
{
    uint32_t tick = gwpin_tick(now);
    uint64_t n = 0, k;
    int j;
    if (buckets > t->mask + 1)
        buckets = t->mask + 1;
    for (k = 0; k < buckets; k++) {
        gwpin_bucket *b = &t->b[t->cursor];
        t->cursor = (t->cursor + 1) & t->mask;
        for (j = 0; j < GWPIN_WAYS; j++) {
            uint64_t w = b->r[j].k1;
            if (w != 0 && gwpin_age(w, tick) > gwpin_tmo(t, w)) {
                b->r[j].k0 = b->r[j].k1 = 0;
                n++;
            }
        }
    }
    t->used -= n;
    t->expired += n;
    return n;
}

#endif
