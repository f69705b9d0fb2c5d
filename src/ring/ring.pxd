# ring declarations: AF_PACKET TPACKET_V3 (or V2) rings (src/ring.h holds the C).
#
# The fused datapath walks RX frames and fills TX frames at C level, nogil:
#
#     cdef ring_frame_t fr[256]
#     n = ring_rx_batch(&rx.r, fr, 256)        # views into the mapping
#     ... for i in range(n): fr[i].data, fr[i].len ...
#     buf = ring_tx_claim(&tx.r, &room)         # NULL: ring full
#     ... write <= room bytes at buf ...; ring_tx_commit(&tx.r, length)
#     ring_tx_flush(&tx.r)                      # one sendto() per batch
#     ring_rx_release(&rx.r)                    # views invalid from here
#
# where rx/tx are PacketRing objects (their `r` field is the C ring).

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "ring/ring.h" nogil:
    struct sock_filter:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k

    ctypedef struct ring_frame_t:
        const uint8_t *data      # Ethernet header
        const uint8_t *vnet      # virtio_net_hdr before it (NULL: vnet_hdr off)
        uint32_t len             # captured bytes
        uint32_t wire_len        # bytes on the wire
        uint32_t status          # TP_STATUS_* bits
        uint16_t vlan_tci

    ctypedef struct ring_cfg_t:
        int ifindex
        uint32_t rx_block_size
        uint32_t rx_block_nr
        uint32_t rx_retire_ms
        uint32_t rx_frame_size
        uint32_t rx_copy_size
        uint32_t tx_frame_size
        uint32_t tx_frame_nr
        int fanout_group
        int fanout_mode
        const sock_filter *fanout_prog
        uint16_t fanout_prog_len
        int qdisc_bypass
        int ignore_outgoing
        int promisc
        int vnet_hdr
        const sock_filter *filter
        uint16_t filter_len

    ctypedef struct ring_t:
        int fd
        int dfd
        int ifindex
        uint32_t vnet
        size_t map_len
        const char *err_where
        uint32_t rx_block_size
        uint32_t rx_block_nr
        uint32_t rx_held
        int v2
        uint32_t tx_frame_size
        uint32_t tx_frame_nr
        uint32_t tx_room
        uint32_t tx_pending
        uint64_t rx_frames
        uint64_t rx_blocks
        uint64_t rx_copied
        uint64_t rx_copy_lost
        uint64_t tx_frames
        uint64_t tx_flushes
        uint64_t tx_full
        uint64_t tx_errors
        uint64_t tx_dropped
        uint64_t tx_direct
        uint64_t k_packets
        uint64_t k_drops
        uint64_t k_freeze

    uint32_t RING_TX_DATA_OFF
    uint32_t RING_RX_FRAME_SIZE
    uint32_t RING_VNET_HDR_LEN

    int ring_open(ring_t *r, const ring_cfg_t *c)
    void ring_close(ring_t *r)
    int ring_set_filter(ring_t *r, const sock_filter *f, uint16_t n)
    int ring_fanout_id(ring_t *r)
    # RX: views valid until ring_rx_release; returns the count taken.
    int ring_rx_ready(ring_t *r)
    int ring_rx_batch(ring_t *r, ring_frame_t *out, int max)
    void ring_rx_release(ring_t *r)
    int ring_rx_wait(ring_t *r, int timeout_ms)     # 1 ready, 0 timeout, -errno
    # TX: claim (NULL when full) -> write -> commit; flush sends them all.
    int ring_tx_free(ring_t *r)
    uint8_t *ring_tx_claim(ring_t *r, uint32_t *room)
    uint8_t *ring_tx_vnet(ring_t *r)                # claimed frame's virtio_net_hdr
    void ring_tx_commit(ring_t *r, uint32_t length)
    int ring_tx_flush(ring_t *r)                    # frames sent, or -errno
    # one large frame now (vnet_hdr rings)
    int ring_tx_direct(ring_t *r, const void *vnet, const uint8_t *data, uint32_t length)
    int ring_tx_wait(ring_t *r, int timeout_ms)     # 1 free, 0 timeout, -errno
    int ring_poll(ring_t *r, short events, int timeout_ms)
    int ring_stats_update(ring_t *r)


cdef class PacketRing:
    cdef ring_t r
    cdef ring_frame_t *frames      # scratch views for Python batch calls
    cdef int batch
    cdef readonly str ifname
    cdef readonly object netns
    cdef readonly bint has_rx
    cdef readonly bint has_tx
    cdef int _check_open(self) except -1
    cdef int _send_rows(self, const uint8_t[:, ::1] data, const uint32_t[::1] lengths,
                        int timeout_ms) except -1
