# nat: the SNAT / connection-tracking table (see nat.pyx for the rules).
#
# C-level API for the fused datapath (all nogil, no Python objects, never
# raise).  The translate/peek calls return 0 (DROP_NONE) on success or a
# DropReason from verdict.pxi and bump the table's counters themselves:
#
#   nat_translate_out(t, orig, ext, now, out)   outgoing packet -> SNATed tuple
#   nat_translate_in(t, reply, now, out)        reply -> tuple towards the pod
#   nat_peek_out(t, orig, now, out)             known flow's translation, no side effect
#   nat_peek_in(t, reply, now, out)             (both for tuples quoted in ICMP errors)
#   nat_update_tcp(t, tuple, dir, now)          TCP state hook (translate_* call it too)
#   nat_ext_find(t, family, addr)               egress IP -> index (-1 if unknown)
#   nat_gc(t, now, max_scan)                    bounded incremental expiry (the
#                                               timing wheel: at most max_scan
#                                               entries examined per call)
#   nat_gc_sweep(t, now)                        every dead entry (a full scan)
#   nat_translate_batch(t, tin, ext, ext_stride, tout, codes, n, now)
#   nat_reverse_batch(t, tin, tout, codes, n, now)
#                                               the same over arrays, with the
#                                               cache misses of many tuples
#                                               overlapped (prefetch pipeline);
#                                               codes[i] = 0 or a DropReason
#   nat_translate_out_len / nat_translate_in_len / nat_translate_batch_len /
#   nat_reverse_batch_len                       the same, also counting each
#                                               packet and its IP length (lens[i])
#                                               in the connection's counters
#   nat_flush(t, now)                           remove every connection (end
#                                               records with reason "eviction")
#   nat_translate_out_pol(t, orig, ext, policy, now, out, length)
#                                               nat_translate_out_len for the
#                                               datapath: a new connection is
#                                               counted to `policy` (t.pol)
#   nat_translate_in_pol(t, reply, now, out, length, policy)
#                                               nat_translate_in_len that also
#                                               gives the connection's policy id
#   _nat_e_policy(e)                            an entry's policy id
#
# Per-policy connections: every connection carries the policy id it was
# opened under (0: none, e.g. masquerade); t.pol[policy_slot(id)] counts the
# connections opened (in this process) and those live (recounted when a
# state file is adopted).
#
# Flow records: with t.flog set (NatTable.flow_log), a connection's creation
# appends a FLOW_START record, its collection (expiry, FIN/RST close, flush) a
# FLOW_END record with its counters, and a refused new flow (exhausted, full)
# a rate-limited FLOW_DROP record.
#
# `now` is CLOCK_MONOTONIC in nanoseconds (NatTable's default Python clock,
# time.monotonic, is the same clock, so both sides can share a table).  Addresses are 16 bytes in network
# order (IPv4 in the first 4 bytes, the rest zero); ports and echo ids are in
# host order.  A table is single-writer: see "Thread model" in nat.pyx.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "nat/nat_helpers.h":
    uint64_t nat_hash3(uint64_t seed, uint64_t w0, uint64_t w1, uint64_t w2) nogil
    uint64_t nat_hash5(uint64_t seed, uint64_t w0, uint64_t w1, uint64_t w2,
                       uint64_t w3, uint64_t w4) nogil
    uint64_t nat_load64(const void* p) nogil
    int nat_eq16(const void* a, const void* b) nogil
    void nat_prefetch(const void* p) nogil
    void nat_prefetch_w(const void* p) nogil
    int nat_ctz64(uint64_t x) nogil
    enum: NAT_NONE          # 0xffffffff: no entry / end of a free list
    enum: NAT_PF_SLOT       # batch pipeline distances
    enum: NAT_PF_ENTRY
    enum: NAT_RPF_SLOT      # the reply batch's distances and ring
    enum: NAT_RPF_ENTRY
    enum: NAT_RPF_RING
    const uint64_t NAT_WHEEL_UNSET  # wheel_cur before the first use

cdef enum:
    NAT_PROTO_ICMP = 1
    NAT_PROTO_TCP = 6
    NAT_PROTO_UDP = 17
    NAT_PROTO_ICMPV6 = 58

    NAT_TCP_FIN = 0x01
    NAT_TCP_SYN = 0x02
    NAT_TCP_RST = 0x04
    NAT_TCP_ACK = 0x10

    # entry states (0 marks a free slot)
    NAT_STATE_FREE = 0
    NAT_STATE_SYN_SENT = 1      # TCP, no reply seen yet
    NAT_STATE_ESTABLISHED = 2   # TCP, reply seen
    NAT_STATE_CLOSING = 3       # TCP, FIN both ways or RST
    NAT_STATE_UDP = 4
    NAT_STATE_ICMP = 5
    NAT_NSTATES = 6

    # entry flags
    NAT_F_FIN_OUT = 1
    NAT_F_FIN_IN = 2
    NAT_F_RST = 4               # closed by a RST (for the end record)
    NAT_F_MASK = 7              # the flag bits (above them: the policy id's high bits)
    NAT_MAP_MASK = 0xffffff     # a live entry's mapping index (above it: the policy id's low byte)
    NAT_POLICY_STORED = 8191    # the largest policy id an entry holds as it is

    NAT_NO_LEN = 0xffffffff     # packet length unknown: do not count the packet

    NAT_DIR_OUT = 0
    NAT_DIR_IN = 1

    NAT_MAX_EXT = 1024          # egress IPs per table
    # an index slot is a hash tag over (entry index + 1): 24 index bits and an
    # 8-bit tag up to 16,777,214 entries, then one index bit more (one tag bit
    # fewer) per doubling, down to a 4-bit tag at the largest capacity
    NAT_MAX_CAPACITY = 268435454    # 2**28 - 2: 28 index bits, 4 tag bits
    NAT_NPOOLS = 3              # per egress IP: TCP, UDP, ICMP echo
    NAT_MAX_SPILL = 8           # egress IPs one egress IP spills to (nat_ext.spill)

    # expiry timing wheel: NAT_WHEEL_SLOTS buckets of 2**NAT_WHEEL_SHIFT ns
    # (134 ms), one revolution = 1100 s; farther expiries wait in the last
    # bucket and are re-bucketed when it comes due
    NAT_WHEEL_SHIFT = 27
    NAT_WHEEL_SLOTS = 8192

    NAT_SRC_V6 = 0x80000000     # nat_src.meta: the address is IPv6
    NAT_SRC_COUNT = 0x7fffffff  # nat_src.meta: live connections of the source
    NAT_SRC_REFUSED_SLOTS = 256  # sources whose refusals are counted one by one

# A packet's flow as the datapath sees it; also the dtype of batch arrays
# (egresscore.NAT_TUPLE_DTYPE, 40 bytes).  For ICMP echo the identifier is
# sport in requests and dport in replies; the other port is ignored.
cdef packed struct nat_tuple:
    uint8_t family              # 4 or 6
    uint8_t proto               # 6, 17, 1 (v4 only), 58 (v6 only)
    uint8_t tcp_flags           # FIN/SYN/RST/ACK bits of this packet
    uint8_t _pad
    uint16_t sport
    uint16_t dport
    uint8_t src[16]
    uint8_t dst[16]

# One connection, 56 bytes, indexed from both directions.  An IPv4
# connection holds its addresses in the entry (a0: pod, a1: remote, 4 bytes
# each in network order); an IPv6 one holds them out of line, in record a0 of
# the IPv6 address pool (nat_addr6, t.a6; a1 is 0), so that IPv4 entries do
# not carry 24 unused bytes of addresses each.  The counters are 32-bit
# bytes and 16-bit packets per direction (index NAT_DIR_OUT/IN): when one
# would wrap, a FLOW_UPDATE record carries the counts so far and they
# restart from zero (without a flow log they stop at their maximum).  The
# fields a reply lookup compares (ports, family, proto, a1, ext) and the
# expiry come first.
cdef struct nat_entry:
    uint64_t expires            # ns; the entry is dead at or after it
    uint32_t a0                 # IPv4 pod address / IPv6: its nat_addr6 record
    uint32_t a1                 # IPv4 remote address / IPv6: 0
    uint16_t sport              # pod port / echo id
    uint16_t dport              # remote port (0 for ICMP)
    uint16_t xport              # translated source port / echo id
    uint16_t ext                # egress IP index
    uint8_t family
    uint8_t proto
    uint8_t state
    uint8_t flags
    uint32_t mapping            # nat_mapping index; next free when free
    uint32_t created_ms         # creation time, ms modulo 2**32 (ages < 49 days)
    uint16_t npkts[2]           # packets by direction
    uint32_t nbytes[2]          # IP bytes by direction
    # expiry wheel list: next, prev (entry index, or capacity + bucket for a bucket's list head)
    uint32_t wl[2]
# The policy id a connection was opened under (0: none; replies and the
# close count to it) is packed into bits the entry does not use: its low 8
# bits in the top byte of `mapping` (a live entry's mapping index is 24
# bits), its high 5 bits in the top of `flags` (the NAT_F_* bits are the low
# 3).  In a table of more than 2**24 - 1 mappings the low 24 bits do not
# hold a mapping index: it is found by its key (_nat_e_mapping).  13 bits:
# ids above NAT_POLICY_STORED are kept as NAT_POLICY_STORED (counted in the
# overflow slot).  Read and write them through _nat_e_mapping /
# _nat_e_policy / _nat_e_set_mapping (nat/conntrack.pyx).

# The addresses of one IPv6 connection (entry.a0 of an IPv6 entry), 32
# bytes.  A free record's next-free link lives in the first 4 bytes of src.
cdef struct nat_addr6:
    uint8_t src[16]
    uint8_t dst[16]

# Endpoint-independent mapping (pod ip, pod port, egress ip, proto) -> xport,
# shared by all connections from that pod endpoint: 16 bytes.  `addr` is the
# IPv4 pod address (network order), or for IPv6 the index of its address in
# t.m6 (16 bytes each, one per IPv6 mapping).  A free mapping's next-free
# link lives in addr.
cdef struct nat_mapping:
    uint32_t addr
    uint16_t port
    uint16_t xport
    uint16_t ext
    uint8_t family
    uint8_t proto
    uint32_t refcnt             # connections using it; 0 = free

# Port allocator of one (egress IP, protocol): a 65536-bit map (out-of-range
# ports pre-set) with a 1024-bit "word full" summary, so finding a free port
# costs at most ~20 word operations whatever the occupancy.
cdef struct nat_pool:
    uint32_t lo
    uint32_t hi
    uint32_t nfree
    uint32_t used
    uint64_t bits[1024]
    uint64_t full[16]

# One egress IP.  Spill (an egresscore extension, configured by the agent
# from the policies; not kept in the state file): a new mapping whose egress
# IP has no free port in its pool is placed on the first of spill[0..nspill)
# that has one; an endpoint's existing mapping on any of them is reused.
cdef struct nat_ext:
    uint8_t family
    uint8_t addr[16]
    nat_pool* pools[3]
    uint16_t nspill
    uint16_t spill[NAT_MAX_SPILL]
    uint64_t spilled_in         # mappings placed here because an earlier IP was full

# An open-addressing index (nat/index.pyx): slot = tag | (entry index + 1),
# the low `ibits` bits the index, the bits above them (tmask) a hash tag.
cdef struct nat_index:
    uint32_t* slots
    uint64_t size
    uint32_t imask              # (1 << ibits) - 1
    uint32_t tmask              # ~imask

# Live connections of one source (pod) address, for the per-source limit:
# an open-addressing table sized at creation (it never fills: a source with
# connections holds at least one entry), 20 bytes a slot, meta 0 = empty.
cdef struct nat_src:
    uint8_t addr[16]
    uint32_t meta               # connections | NAT_SRC_V6

# New connections refused to one source by the per-source limit (a fixed
# table: the first NAT_SRC_REFUSED_SLOTS sources refused, then "other").
cdef struct nat_src_refusal:
    uint8_t addr[16]
    uint32_t family             # 0 = empty slot
    uint64_t count

# Connections of one policy slot (includes/policy.pxd).
cdef struct nat_policy_conns:
    uint64_t opened             # connections created under the policy
    uint64_t live               # of them (and of adopted ones) not yet collected

cdef struct nat_table:
    nat_entry* entries
    nat_mapping* mappings
    # IPv6 addresses, out of line: a6 of the entries (in the state file when
    # there is one), m6 of the mappings (16 bytes each, a free one's link in
    # its first 4); a6_capacity records each, handed out from index 0 up
    # (hwm), then from their free lists
    nat_addr6* a6
    uint8_t* m6                 # 16 bytes per record
    uint64_t* a6_claim          # while adopting: a6 records taken (a bit each), else NULL
    uint32_t a6_capacity
    uint32_t a6_used
    uint32_t a6_hwm
    uint32_t a6_free_head
    uint32_t m6_used
    uint32_t m6_hwm
    uint32_t m6_free_head
    nat_index fwd               # original tuple -> entry
    nat_index rev               # reply tuple -> entry
    nat_index map               # pod endpoint + egress IP -> mapping
    uint32_t capacity
    uint32_t map_capacity       # mappings (= capacity: at most one per entry)
    uint32_t used
    uint32_t free_head
    uint32_t map_free_head
    uint32_t map_used
    uint32_t entries_hwm        # entries [hwm, capacity) never used yet (free)
    uint32_t mappings_hwm
    uint32_t n_ext
    nat_ext ext[1024]
    uint64_t seed
    uint64_t rng
    uint64_t timeout[6]         # ns, by state
    # counters
    uint64_t lookups
    uint64_t hits
    uint64_t created_count
    uint64_t expired
    uint64_t gc_runs
    uint64_t gc_examined        # entries the wheel looked at (collected or moved)
    uint64_t drops[DROP_REASON_MAX]     # by DropReason
    uint64_t a6_full            # new IPv6 connections refused: the IPv6 address pool was full
    flow_log* flog              # flow records go here when not NULL
    # expiry timing wheel: bucket b's list head is wheel[2*b] (next),
    # wheel[2*b+1] (prev); wheel_cur is the absolute bucket number (expiry
    # >> NAT_WHEEL_SHIFT) gc looks at next, NAT_WHEEL_UNSET before any use
    uint32_t* wheel
    uint64_t wheel_cur
    # per-source connection limit (0: off, src == NULL)
    uint32_t src_limit
    uint32_t src_used           # sources holding connections
    nat_src* src
    uint64_t src_size
    nat_src_refusal refused_src[256]
    uint32_t refused_src_used
    uint64_t refused_src_other  # refusals of sources beyond the table
    nat_policy_conns* pol       # POLICY_SLOTS records, by policy_slot(entry policy)

cdef int nat_translate_out(nat_table* t, const nat_tuple* orig, uint32_t ext,
                           uint64_t now, nat_tuple* out) noexcept nogil
cdef int nat_translate_in(nat_table* t, const nat_tuple* reply, uint64_t now,
                          nat_tuple* out) noexcept nogil
cdef int nat_peek_out(nat_table* t, const nat_tuple* orig, uint64_t now,
                      nat_tuple* out) noexcept nogil
cdef int nat_peek_in(nat_table* t, const nat_tuple* reply, uint64_t now,
                     nat_tuple* out) noexcept nogil
cdef int nat_update_tcp(nat_table* t, const nat_tuple* k, int direction,
                        uint64_t now) noexcept nogil
cdef int nat_ext_find(nat_table* t, uint8_t family, const uint8_t* addr) noexcept nogil
cdef uint32_t nat_gc(nat_table* t, uint64_t now, uint32_t max_scan) noexcept nogil
cdef uint32_t nat_gc_sweep(nat_table* t, uint64_t now) noexcept nogil
cdef void nat_translate_batch(nat_table* t, const nat_tuple* tin, const uint16_t* ext,
                              Py_ssize_t ext_stride, nat_tuple* tout, uint8_t* codes,
                              Py_ssize_t n, uint64_t now) noexcept nogil
cdef void nat_reverse_batch(nat_table* t, const nat_tuple* tin, nat_tuple* tout,
                            uint8_t* codes, Py_ssize_t n, uint64_t now) noexcept nogil
cdef int nat_translate_out_len(nat_table* t, const nat_tuple* orig, uint32_t ext,
                               uint64_t now, nat_tuple* out, uint32_t length) noexcept nogil
cdef int nat_translate_in_len(nat_table* t, const nat_tuple* reply, uint64_t now,
                              nat_tuple* out, uint32_t length) noexcept nogil
cdef void nat_translate_batch_len(nat_table* t, const nat_tuple* tin, const uint16_t* ext,
                                  Py_ssize_t ext_stride, nat_tuple* tout, uint8_t* codes,
                                  Py_ssize_t n, uint64_t now,
                                  const uint32_t* lens) noexcept nogil
cdef void nat_reverse_batch_len(nat_table* t, const nat_tuple* tin, nat_tuple* tout,
                                uint8_t* codes, Py_ssize_t n, uint64_t now,
                                const uint32_t* lens) noexcept nogil
cdef uint32_t nat_flush(nat_table* t, uint64_t now) noexcept nogil
cdef int nat_translate_out_pol(nat_table* t, const nat_tuple* orig, uint32_t ext, uint32_t policy,
                               uint64_t now, nat_tuple* out, uint32_t length) noexcept nogil
cdef int nat_translate_in_pol(nat_table* t, const nat_tuple* reply, uint64_t now,
                              nat_tuple* out, uint32_t length, uint32_t* policy) noexcept nogil

cdef class NatTable:
    cdef nat_table* t
    cdef object _clock
    cdef object _lock
    cdef list _ext_names
    cdef dict _ext_index
    cdef dict _timeouts
    cdef dict _ranges
    cdef object _flow_log
    cdef object _state          # _NatStateFile when the table lives in a file (nat/state.pyx)
    cdef char* _smap            # its MAP_SHARED mapping, _smap_size bytes
    cdef size_t _smap_size
    cdef uint64_t _now(self, now) except? 0
    cdef int _egress(self, egress_ip, int family) except -1
    cdef void _tuple(self, nat_tuple* k, src, sport, dst, dport, proto, tcp_flags) except *
    cdef int _ext_of(self, nat_tuple* out) noexcept
    cdef object _entry(self, uint32_t idx, uint64_t now)
    cdef list _state_map(self, object path, uint32_t cap, object ranges, uint64_t seed, uint64_t now)
    cdef int _state_adopt(self, list exts, uint64_t now) except -1
    cdef int _state_convert3(self, object st, const uint64_t* maxt, uint64_t now, object started) except -1
    cdef void _state_write_config(self, object ranges)
