# flowlog: the flow-log record ring (see flowlog.pyx).
#
# C-level API (nogil, never blocks, never raises):
#
#   flow_append(fl, rec)              copy one record into the ring; 0, or -1
#                                     when the ring is full (the record is
#                                     lost and counted in fl.lost)
#   flow_drop(fl, now, reason, family, proto, sport, dport, src, dst, policy)
#                                     a drop record, through the per-reason
#                                     token bucket (suppressed ones counted)
#   flow_drop_allow(fl, reason, now)  the bucket alone (take a token, or count
#                                     the record as suppressed), then
#   flow_drop_record(...)             the record without the bucket: for a
#                                     caller that parses only what it keeps
#
# Times are CLOCK_MONOTONIC nanoseconds (the NAT table's clock); the Python
# side converts them to wall-clock time when it drains.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t

cdef extern from "flowlog/flow_ring.h":
    int64_t flow_ring_claim(uint64_t* enq, uint64_t* seq, uint64_t mask) nogil
    void flow_ring_publish(uint64_t* seq, uint64_t mask, uint64_t pos) nogil
    int flow_ring_ready(uint64_t* seq, uint64_t mask, uint64_t pos) nogil
    void flow_ring_release(uint64_t* seq, uint64_t mask, uint64_t pos) nogil
    void flow_atomic_add(uint64_t* p, uint64_t v) nogil
    uint64_t flow_atomic_load(uint64_t* p) nogil

cdef enum:
    # record kinds
    FLOW_START = 1              # a connection was created (first packet translated)
    FLOW_END = 2                # a connection ended: see the end reason
    FLOW_DROP = 3               # a packet was dropped: reason is a DropReason
    # interim counts of a live connection (its counters were about to wrap and were reset)
    FLOW_UPDATE = 4
    FLOW_NKINDS = 5

    # end reasons (records of kind FLOW_END)
    FLOW_END_EXPIRY = 1         # idle timeout
    FLOW_END_FIN = 2            # FIN both ways, then the closing timeout
    FLOW_END_RST = 3            # RST, then the closing timeout
    FLOW_END_EVICTION = 4       # removed while alive (table flushed / stopped)

    FLOW_NO_POLICY = 0xffff

# One record, 128 bytes (egresscore.FLOW_RECORD_DTYPE).  Addresses are 16
# bytes in network order (IPv4 in the first 4), ports in host order.  Counts
# are those of the connection since its start (or its last FLOW_UPDATE).
cdef packed struct flow_record:
    uint64_t time               # ns, CLOCK_MONOTONIC
    uint64_t duration           # ns since the connection started (end/update)
    uint8_t kind
    uint8_t reason              # end reason or DropReason
    uint8_t family
    uint8_t proto
    uint16_t sport
    uint16_t dport
    uint8_t src[16]             # original source (the pod)
    uint8_t dst[16]             # remote
    uint8_t xsrc[16]            # translated source: the egress IP
    uint16_t xport              # translated source port / echo id
    uint16_t policy             # policy id, FLOW_NO_POLICY when unknown
    uint32_t pkts_out
    uint32_t pkts_in
    uint8_t gateway[16]         # gateway node IP (zero when unknown)
    uint64_t bytes_out          # IP bytes, pod -> remote
    uint64_t bytes_in           # IP bytes, remote -> pod
    uint8_t tcp_flags           # flags of the packet (drop records)
    uint8_t _pad[11]

cdef struct flow_log:
    flow_record* recs
    uint64_t* seq
    uint64_t mask               # capacity - 1 (a power of two)
    uint64_t enq                # next position to claim (producers)
    uint64_t deq                # next position to read (the one consumer)
    uint64_t appended[5]        # records written, by kind
    uint64_t lost               # records lost: ring full
    # drop records: a token bucket per DropReason, credit in ns
    uint64_t drop_interval      # ns of credit one record costs; 0 = no drop records
    uint64_t drop_burst         # credit cap (burst * interval)
    uint64_t credit[DROP_REASON_MAX]
    uint64_t last[DROP_REASON_MAX]
    uint64_t suppressed[DROP_REASON_MAX]    # drop records refused by the bucket, by reason

cdef int flow_append(flow_log* fl, const flow_record* rec) noexcept nogil
cdef int flow_drop(flow_log* fl, uint64_t now, uint8_t reason, uint8_t family,
                   uint8_t proto, uint16_t sport, uint16_t dport, const uint8_t* src,
                   const uint8_t* dst, uint16_t policy, uint8_t tcp_flags) noexcept nogil
cdef bint flow_drop_allow(flow_log* fl, uint8_t reason, uint64_t now) noexcept nogil
cdef int flow_drop_record(flow_log* fl, uint64_t now, uint8_t reason, uint8_t family,
                          uint8_t proto, uint16_t sport, uint16_t dport, const uint8_t* src,
                          const uint8_t* dst, uint16_t policy, uint8_t tcp_flags) noexcept nogil

cdef class FlowLog:
    cdef flow_log* fl
    cdef object _lock
    cdef double _rate
    cdef double _burst
    cdef flow_log* _get(self) except NULL
