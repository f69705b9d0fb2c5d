# gwpin: the gateway each connection from a local pod started on (see
# gwpin.h for the layout and the rules), for make-before-break.
#
#   gwpin_pick(t, k0, k1, flags, now, node, &rec)   the flow's gateway node:
#                                               its live pin, else `node`
#                                               (which becomes its pin)
#   gwpin_repin(t, rec, node)                   move a pin (gateway unusable)
#   gwpin_prefetch(t, k0, k1)                   the flow's bucket, ahead of use
#   gwpin_flush_node(t, node) / gwpin_clear(t)  drop pins (a gateway down)
#   gwpin_sweep(t, now, buckets)                bounded expiry work
#
# Keys: gwpin_key0(src, dst), gwpin_key1(proto, sport, dport), IPv4 host
# order.  `now` is CLOCK_MONOTONIC ns, as the NAT table's.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "gwpin/gwpin.h" nogil:
    enum: GWPIN_WAYS
    enum: GWPIN_TICK_SHIFT
    enum: GWPIN_MAX_TICKS
    enum: GWPIN_MAX_RECORDS
    enum: GWPIN_PREFETCH_BYTES
    const uint64_t GWPIN_CLOSING
    ctypedef struct gwpin_rec:
        uint64_t k0
        uint64_t k1
    ctypedef struct gwpin_bucket:
        gwpin_rec r[4]
    ctypedef struct gwpin_table:
        gwpin_bucket *b
        uint64_t mask
        uint64_t seed
        uint32_t tmo[4]
        uint32_t prefetch
        uint64_t cursor
        uint64_t used
        uint64_t pinned
        uint64_t kept
        uint64_t kept_nat
        uint64_t repinned
        uint64_t expired
        uint64_t evicted
        uint64_t flushed
    uint64_t gwpin_key0(uint32_t src, uint32_t dst)
    uint64_t gwpin_key1(uint8_t proto, uint16_t sport, uint16_t dport)
    void gwpin_prefetch(const gwpin_table *t, uint64_t k0, uint64_t k1)
    uint32_t gwpin_tick(uint64_t now_ns)
    uint32_t gwpin_tmo(const gwpin_table *t, uint64_t k1)
    uint32_t gwpin_age(uint64_t k1, uint32_t tick)
    uint32_t gwpin_node(uint64_t k1)
    uint32_t gwpin_pick(gwpin_table *t, uint64_t k0, uint64_t k1, uint8_t flags, uint64_t now,
                        uint32_t node, gwpin_rec **rec)
    void gwpin_repin(gwpin_table *t, gwpin_rec *r, uint32_t node)
    uint64_t gwpin_flush_node(gwpin_table *t, uint32_t node)
    uint64_t gwpin_clear(gwpin_table *t)
    uint64_t gwpin_sweep(gwpin_table *t, uint64_t now, uint64_t buckets)

cdef class GatewayPins:
    cdef gwpin_table *t
    cdef size_t _bytes
    cdef dict _timeouts
