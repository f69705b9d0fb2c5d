# nat/state: the NAT table in a shared-memory file (nat/state.pyx).
#
# The file is one MAP_SHARED mapping: a 4 KiB header, the egress IP records,
# the entries, then the IPv6 connections' address records, at page-aligned offsets computed from the capacity
# (_nat_state_regions in state.pyx).  No pointer is ever stored in it.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    # version 2: entries carry their policy id (in mapping's and flags' top bits);
    # 3: the file holds only the entries (everything else is rebuilt in memory);
    # 4: 56-byte entries, IPv6 addresses out of line in the file's a6 region
    NAT_STATE_VERSION = 4
    NAT_STATE_HDR_SIZE = 4096

    # nat_state_link / nat_state_insert results
    NAT_ADOPT_OK = 0
    NAT_ADOPT_INVALID = 1       # fields out of range or inconsistent: dropped
    NAT_ADOPT_EXPIRED = 2       # valid but dead: dropped
    NAT_ADOPT_FREE = 3          # a free slot
    NAT_ADOPT_FULL = 4          # nat_state_insert: no free slot

# The header at offset 0.  `layout` is a checksum of the struct sizes and
# field offsets of this build; the configuration fields say what the arrays
# were built for.
cdef struct nat_state_hdr:
    uint8_t magic[8]            # "EGCNAT\0\0"
    uint32_t version
    uint32_t hdr_size
    uint64_t layout
    uint64_t file_size
    uint8_t boot_id[40]         # /proc/sys/kernel/random/boot_id (CLOCK_MONOTONIC's epoch)
    uint64_t created_unix_ns    # CLOCK_REALTIME at creation
    uint64_t created_mono_ns    # CLOCK_MONOTONIC at creation
    uint64_t adopted_count      # times a process adopted the file
    uint32_t capacity
    uint32_t n_ext              # egress IP records in use (written after the record)
    uint64_t index_slots
    uint64_t src_slots
    uint64_t seed               # the running table's hash seed (informational: indexes are rebuilt)
    uint64_t timeout[6]         # ns by state, of the writer
    uint32_t src_limit
    uint32_t port_lo[3]         # the table's default ranges (tcp, udp, icmp)
    uint32_t port_hi[3]
    uint32_t a6_capacity        # IPv6 address records (the a6 region after the entries)

# One egress IP (index i of the table is record i): its pools are region
# pools[3 * i .. 3 * i + 2].
cdef struct nat_state_ext:
    uint8_t family
    uint8_t _pad[3]
    uint8_t addr[16]
    uint32_t lo[3]
    uint32_t hi[3]

cdef int nat_state_link(nat_table* t, uint32_t idx, uint64_t now,
                        const uint64_t* max_timeout) noexcept nogil
cdef int nat_state_insert(nat_table* t, const nat_entry* e, const uint8_t* src,
                          const uint8_t* dst, uint64_t now) noexcept nogil

# A format 3 file's entry (main's layout before format 4), 80 bytes: the
# addresses in line.  Read only, to convert such a file (nat_state_convert3).
cdef struct nat_entry_v3:
    uint8_t src[16]
    uint8_t dst[16]
    uint64_t expires
    uint16_t sport
    uint16_t dport
    uint16_t xport
    uint16_t ext
    uint32_t mapping
    uint8_t family
    uint8_t proto
    uint8_t state
    uint8_t flags
    uint32_t created_ms
    uint32_t nbytes[2]
    uint16_t npkts[2]
    uint32_t wl[2]
