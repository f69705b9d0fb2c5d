/* ring.h: AF_PACKET TPACKET_V3 (or V2) receive and transmit rings, walked in place.
 *
 * One socket, one mapping: the RX ring at offset 0 and the TX ring (fixed-size
 * frames) right after it.  The RX ring has two modes:
 * - TPACKET_V3 (rx_frame_size 0): frames packed into blocks, a block handed
 *   over when full or after rx_retire_ms.  Throughput; but a sparse flow's
 *   frames wait up to the retire timeout (>= 1 ms) in the open block.
 * - TPACKET_V2 (rx_frame_size > 0): fixed frame slots, each handed over (and
 *   the poller woken) as it lands.  Latency; a packet larger than its slot
 *   is cut (len < wire_len), unless rx_copy_size > 0: then the kernel also
 *   queues it whole on the socket (PACKET_COPY_THRESH, TP_STATUS_COPY on
 *   the slot) and the batch reads it into a buffer of that size.  So slots
 *   sized for the common frame hold many thousands of them (a burst), and
 *   the rare super-packet still passes whole, at one recv() more.
 * The socket has one version, so TX uses the same header kind as RX.
 *
 * RX (V3): the kernel fills whole blocks and flips block_status to TP_STATUS_USER.
 * ring_rx_batch() walks ready blocks and returns (pointer, length) views into
 * the mapping; they stay valid until ring_rx_release(), which hands every
 * fully walked block back with a release store of TP_STATUS_KERNEL (the
 * reads of the block happen before the kernel may reuse it).  A block that
 * is only partly walked stays held until a later batch finishes it.
 * RX (V2): the same with one frame slot per packet instead of a block.
 *
 * TX: ring_tx_claim() returns the data area of the next free frame (NULL
 * when the ring is full), ring_tx_commit() publishes its length and sets
 * TP_STATUS_SEND_REQUEST with a release store, ring_tx_flush() issues one
 * sendto() for everything committed.  The kernel's tpacket_snd() treats V2
 * and V3 TX frames alike (frame ring, tp_next_offset must be 0), so V3 costs
 * nothing and lets RX and TX share one socket and one mapping.
 *
 * Return contract: functions returning int give 0 (or a count) on success and
 * -errno on failure; nothing here allocates per packet or takes the GIL.
 */
#ifndef EGRESSCORE_RING_H
#define EGRESSCORE_RING_H

#include <arpa/inet.h>
#include <errno.h>
#include <linux/filter.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef PACKET_QDISC_BYPASS
#define PACKET_QDISC_BYPASS 20
#endif
#ifndef PACKET_FANOUT_DATA
#define PACKET_FANOUT_DATA 22
#endif
#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

/* Data starts right after the aligned V3 (V2) header on TX (the kernel's
 * tp_hdrlen - sizeof(struct sockaddr_ll) when PACKET_TX_HAS_OFF is off). */
#define RING_TX_DATA_OFF ((uint32_t)TPACKET_ALIGN(sizeof(struct tpacket3_hdr)))
#define RING_TX_DATA_OFF_V2 ((uint32_t)TPACKET_ALIGN(sizeof(struct tpacket2_hdr)))
#define RING_RX_FRAME_SIZE 2048u /* V3 only checks it; frames are packed */
#define RING_VNET_HDR_LEN 10u    /* sizeof(struct virtio_net_hdr) */

typedef struct ring_frame {
    const uint8_t *data;   /* first byte of the Ethernet header */
    const uint8_t *vnet;   /* struct virtio_net_hdr before it, NULL if off */
    uint32_t len;          /* captured bytes at data (tp_snaplen) */
    uint32_t wire_len;     /* length on the wire (tp_len) */
    uint32_t status;       /* TP_STATUS_* bits (csum, vlan, losing) */
    uint16_t vlan_tci;
    uint16_t pkttype;      /* unused by V3 headers: always 0 */
} ring_frame_t;

typedef struct ring_cfg {
    int ifindex;
    uint32_t rx_block_size;   /* 0 = no RX ring */
    uint32_t rx_block_nr;
    uint32_t rx_retire_ms;
    uint32_t rx_frame_size;   /* > 0: TPACKET_V2 slots of this size; 0: V3 blocks */
    uint32_t rx_copy_size;    /* V2, > 0: larger frames whole through the socket, up to this */
    uint32_t tx_frame_size;   /* 0 = no TX ring */
    uint32_t tx_frame_nr;
    int fanout_group;         /* < 0: no fanout */
    int fanout_mode;          /* PACKET_FANOUT_* | flags (FLAG_UNIQUEID with group 0: the kernel picks it) */
    const struct sock_filter *fanout_prog;  /* PACKET_FANOUT_CBPF: the group's steering program */
    uint16_t fanout_prog_len;
    int qdisc_bypass;
    int ignore_outgoing;
    int promisc;
    int vnet_hdr;             /* PACKET_VNET_HDR: virtio_net_hdr per frame */
    const struct sock_filter *filter;
    uint16_t filter_len;
} ring_cfg_t;

typedef struct ring {
    int fd;
    int dfd;                 /* plain send socket for large frames (vnet_hdr rings), -1 if none */
    int ifindex;
    uint32_t vnet;           /* virtio_net_hdr bytes per frame (0: off) */
    uint8_t *map;
    size_t map_len;
    const char *err_where;   /* which step failed, for the Python error */
    /* RX */
    uint8_t *rx;
    uint32_t rx_block_size, rx_block_nr;
    uint32_t rx_cur;         /* block being walked or next to look at */
    uint32_t rx_rel;         /* oldest block still held */
    uint32_t rx_held;        /* blocks held: closed ones plus the open one */
    uint32_t rx_left;        /* frames left in the open block */
    uint8_t *rx_next;        /* next frame of the open block, NULL if none */
    int v2;                  /* TPACKET_V2: rx_* count frame slots, not blocks */
    uint32_t rx_frame_size, rx_fpb;
    uint8_t *rx_big;         /* V2: the buffer a frame larger than its slot is read into */
    uint32_t rx_big_size;
    /* TX */
    uint8_t *tx;
    uint32_t tx_frame_size, tx_frame_nr, tx_fpb, tx_block_size, tx_room;
    uint32_t tx_cur;
    uint32_t tx_off;         /* data offset in a TX frame (header kind) */
    uint32_t tx_pending;     /* committed since the last successful flush */
    /* counters */
    uint64_t rx_frames, rx_blocks;
    uint64_t rx_copied;      /* frames larger than their slot, read whole from the socket */
    uint64_t rx_copy_lost;   /* such frames the kernel could not queue (receive buffer full) */
    uint64_t tx_frames, tx_flushes, tx_full, tx_errors;
    uint64_t tx_dropped;     /* frames given up on: the TX ring (send buffer) stayed full */
    uint64_t tx_direct;      /* frames sent by ring_tx_direct */
    uint64_t k_packets, k_drops, k_freeze;
} ring_t;

static inline struct tpacket_block_desc *ring_rx_block(ring_t *r, uint32_t i)
{
    return (struct tpacket_block_desc *)(r->rx + (size_t)i * r->rx_block_size);
}

/* V2 RX frame slot i */
static inline struct tpacket2_hdr *ring_rx_slot(ring_t *r, uint32_t i)
{
    return (struct tpacket2_hdr *)(r->rx + (size_t)(i / r->rx_fpb) * r->rx_block_size
                                   + (size_t)(i % r->rx_fpb) * r->rx_frame_size);
}

static inline uint8_t *ring_tx_frame(ring_t *r, uint32_t i)
{
    return r->tx + (size_t)(i / r->tx_fpb) * r->tx_block_size + (size_t)(i % r->tx_fpb) * r->tx_frame_size;
}

static inline uint32_t *ring_tx_status(ring_t *r, uint32_t i)
{
    uint8_t *h = ring_tx_frame(r, i);
    return r->v2 ? &((struct tpacket2_hdr *)h)->tp_status : &((struct tpacket3_hdr *)h)->tp_status;
}

static inline int ring_setopt(ring_t *r, int level, int name, const void *v, socklen_t n,
                              const char *where)
{
    if (setsockopt(r->fd, level, name, v, n) < 0) {
        r->err_where = where;
        return -errno;
    }
    return 0;
}

static inline void ring_close(ring_t *r)
{
    if (r->dfd >= 0)
        close(r->dfd);
    r->dfd = -1;
    if (r->map != NULL && r->map != MAP_FAILED)
        munmap(r->map, r->map_len);
    free(r->rx_big);
    r->rx_big = NULL;
    r->map = NULL;
    r->rx = r->tx = NULL;
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
}

/* The direct-send socket of a vnet_hdr ring: a socket with a TX ring always
 * sends from the ring, so large frames (GSO super-packets) go through a
 * second, ring-less socket bound to the same interface.  Its send() copies
 * the frame once, straight from where it lies (an RX slot); through the TX
 * ring it would be copied into the ring, then again by veth and the like,
 * which must unshare the ring's zero-copy pages. */
static inline int ring_open_direct(ring_t *r, const ring_cfg_t *c)
{
    int one = 1, sndbuf = 8 << 20;
    struct sockaddr_ll sll;
    r->dfd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (r->dfd < 0) {
        r->err_where = "socket(AF_PACKET) for direct send";
        return -errno;
    }
    if (setsockopt(r->dfd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) < 0 ||
        (c->qdisc_bypass && setsockopt(r->dfd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)) < 0)) {
        r->err_where = "direct send socket options";
        return -errno;
    }
    /* room for several super-packets in flight (SO_SNDBUFFORCE needs CAP_NET_ADMIN) */
    if (setsockopt(r->dfd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) < 0)
        setsockopt(r->dfd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = 0;          /* send only */
    sll.sll_ifindex = c->ifindex;
    if (bind(r->dfd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        r->err_where = "bind (direct send)";
        return -errno;
    }
    return 0;
}

/* V2 slots smaller than the largest frame: the kernel queues a frame that
 * does not fit whole on the socket as well (PACKET_COPY_THRESH) and marks
 * its cut slot TP_STATUS_COPY.  The receive buffer holds a few dozen
 * super-packets (SO_RCVBUFFORCE needs CAP_NET_ADMIN; else what SO_RCVBUF
 * grants); beyond that a large frame arrives cut and is counted. */
static inline int ring_open_copy(ring_t *r, const ring_cfg_t *c)
{
    int one = 1, rcvbuf = 8 << 20, rc;
    if ((rc = ring_setopt(r, SOL_PACKET, PACKET_COPY_THRESH, &one, sizeof(one), "PACKET_COPY_THRESH")))
        return rc;
    if (setsockopt(r->fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0)
        setsockopt(r->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    r->rx_big = malloc(c->rx_copy_size);
    if (r->rx_big == NULL) {
        r->err_where = "the RX copy buffer";
        return -ENOMEM;
    }
    r->rx_big_size = c->rx_copy_size;
    return 0;
}

/* Open the socket, set it up, map the rings, attach the filter, then bind:
 * until bind the socket has protocol 0 and sees nothing, so no packet
 * escapes the filter.  On failure everything is released, r->err_where
 * names the step and -errno is returned. */
static inline int ring_open(ring_t *r, const ring_cfg_t *c)
{
    int rc, one = 1, v = c->rx_frame_size ? TPACKET_V2 : TPACKET_V3;
    size_t rx_len = 0, tx_len = 0;

    memset(r, 0, sizeof(*r));
    r->fd = -1;
    r->dfd = -1;
    r->ifindex = c->ifindex;
    r->v2 = v == TPACKET_V2;
    r->tx_off = r->v2 ? RING_TX_DATA_OFF_V2 : RING_TX_DATA_OFF;
    r->fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (r->fd < 0) {
        r->err_where = "socket(AF_PACKET)";
        return -errno;
    }
    if ((rc = ring_setopt(r, SOL_PACKET, PACKET_VERSION, &v, sizeof(v), "PACKET_VERSION")))
        goto fail;
    if (c->tx_frame_size &&
        (rc = ring_setopt(r, SOL_PACKET, PACKET_LOSS, &one, sizeof(one), "PACKET_LOSS")))
        goto fail;
    if (c->vnet_hdr) {
        if ((rc = ring_setopt(r, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one),
                              "PACKET_VNET_HDR")))
            goto fail;
        r->vnet = RING_VNET_HDR_LEN;
    }
    if (c->rx_block_size) {
        struct tpacket_req3 q;
        memset(&q, 0, sizeof(q));
        q.tp_block_size = c->rx_block_size;
        q.tp_block_nr = c->rx_block_nr;
        if (r->v2) {   /* struct tpacket_req is the head of tpacket_req3 */
            r->rx_frame_size = c->rx_frame_size;
            r->rx_fpb = c->rx_block_size / c->rx_frame_size;
            q.tp_frame_size = c->rx_frame_size;
            q.tp_frame_nr = r->rx_fpb * c->rx_block_nr;
        } else {
            q.tp_frame_size = RING_RX_FRAME_SIZE;
            q.tp_frame_nr = (c->rx_block_size / RING_RX_FRAME_SIZE) * c->rx_block_nr;
            q.tp_retire_blk_tov = c->rx_retire_ms;
        }
        if ((rc = ring_setopt(r, SOL_PACKET, PACKET_RX_RING, &q, sizeof(q), "PACKET_RX_RING")))
            goto fail;
        if (r->v2 && c->rx_copy_size > c->rx_frame_size && (rc = ring_open_copy(r, c)))
            goto fail;
        r->rx_block_size = c->rx_block_size;
        r->rx_block_nr = c->rx_block_nr;
        rx_len = (size_t)c->rx_block_size * c->rx_block_nr;
    }
    if (c->tx_frame_size) {
        struct tpacket_req3 q;
        uint32_t bs = 4096;
        while (bs < c->tx_frame_size)
            bs <<= 1;
        while (bs < (1u << 16) && bs * 2 <= c->tx_frame_size * c->tx_frame_nr)
            bs <<= 1;
        memset(&q, 0, sizeof(q));
        r->tx_fpb = bs / c->tx_frame_size;
        q.tp_block_size = bs;
        q.tp_block_nr = (c->tx_frame_nr + r->tx_fpb - 1) / r->tx_fpb;
        q.tp_frame_size = c->tx_frame_size;
        q.tp_frame_nr = q.tp_block_nr * r->tx_fpb;
        if ((rc = ring_setopt(r, SOL_PACKET, PACKET_TX_RING, &q, sizeof(q), "PACKET_TX_RING")))
            goto fail;
        r->tx_frame_size = c->tx_frame_size;
        r->tx_frame_nr = q.tp_frame_nr;
        r->tx_block_size = bs;
        r->tx_room = c->tx_frame_size - r->tx_off - r->vnet;
        tx_len = (size_t)bs * q.tp_block_nr;
    }
    if (rx_len + tx_len) {
        r->map_len = rx_len + tx_len;
        r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      r->fd, 0);
        if (r->map == MAP_FAILED) {
            r->map = NULL;
            rc = -errno;
            r->err_where = "mmap";
            goto fail;
        }
        r->rx = rx_len ? r->map : NULL;
        r->tx = tx_len ? r->map + rx_len : NULL;
    }
    if (c->filter_len) {
        struct sock_fprog p;
        p.len = c->filter_len;
        p.filter = (struct sock_filter *)c->filter;
        if ((rc = ring_setopt(r, SOL_SOCKET, SO_ATTACH_FILTER, &p, sizeof(p), "SO_ATTACH_FILTER")))
            goto fail;
    }
    if (c->qdisc_bypass &&
        (rc = ring_setopt(r, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one),
                          "PACKET_QDISC_BYPASS")))
        goto fail;
    if (c->ignore_outgoing &&
        (rc = ring_setopt(r, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one),
                          "PACKET_IGNORE_OUTGOING")))
        goto fail;
    {
        struct sockaddr_ll sll;
        memset(&sll, 0, sizeof(sll));
        sll.sll_family = AF_PACKET;
        /* A TX-only ring needs no receive hook: protocol 0 keeps it deaf. */
        sll.sll_protocol = c->rx_block_size ? htons(ETH_P_ALL) : 0;
        sll.sll_ifindex = c->ifindex;
        if (bind(r->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
            rc = -errno;
            r->err_where = "bind";
            goto fail;
        }
    }
    if (c->promisc) {
        struct packet_mreq m;
        memset(&m, 0, sizeof(m));
        m.mr_ifindex = c->ifindex;
        m.mr_type = PACKET_MR_PROMISC;
        if ((rc = ring_setopt(r, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &m, sizeof(m),
                              "PACKET_ADD_MEMBERSHIP(PROMISC)")))
            goto fail;
    }
    if (c->fanout_group >= 0) {
        int arg = (c->fanout_group & 0xffff) | (c->fanout_mode << 16);
        if ((rc = ring_setopt(r, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg), "PACKET_FANOUT")))
            goto fail;
        if (c->fanout_prog_len) {
            /* the group's program (every member may set it; the last one set is in force) */
            struct sock_fprog p;
            p.len = c->fanout_prog_len;
            p.filter = (struct sock_filter *)c->fanout_prog;
            if ((rc = ring_setopt(r, SOL_PACKET, PACKET_FANOUT_DATA, &p, sizeof(p), "PACKET_FANOUT_DATA")))
                goto fail;
        }
    }
    if (c->tx_frame_size && c->vnet_hdr && (rc = ring_open_direct(r, c)))
        goto fail;
    return 0;
fail:
    ring_close(r);
    return rc;
}

/* The fanout group id of the socket, or -1 when it is in none. */
static inline int ring_fanout_id(ring_t *r)
{
    int v = 0;
    socklen_t l = sizeof(v);
    if (getsockopt(r->fd, SOL_PACKET, PACKET_FANOUT, &v, &l) < 0 || v == 0)
        return -1;  /* 0: no group (a group's word also carries its mode, never 0 with an id of 0 in hash mode) */
    return v & 0xffff;
}

/* Replace the socket filter (len 0: detach).  0 or -errno. */
static inline int ring_set_filter(ring_t *r, const struct sock_filter *f, uint16_t len)
{
    if (len == 0) {
        int dummy = 0;
        if (setsockopt(r->fd, SOL_SOCKET, SO_DETACH_FILTER, &dummy, sizeof(dummy)) < 0 &&
            errno != ENOENT)
            return -errno;
        return 0;
    }
    struct sock_fprog p;
    p.len = len;
    p.filter = (struct sock_filter *)f;
    return setsockopt(r->fd, SOL_SOCKET, SO_ATTACH_FILTER, &p, sizeof(p)) < 0 ? -errno : 0;
}

/* ---- RX -------------------------------------------------------------- */

/* RX slots (V2) or blocks (V3) in the ring */
static inline uint32_t ring_rx_units(ring_t *r)
{
    return r->v2 ? r->rx_fpb * r->rx_block_nr : r->rx_block_nr;
}

/* 1 if a frame can be taken without waiting. */
static inline int ring_rx_ready(ring_t *r)
{
    if (r->v2)
        return r->rx != NULL && r->rx_held < ring_rx_units(r) &&
               (__atomic_load_n(&ring_rx_slot(r, r->rx_cur)->tp_status, __ATOMIC_ACQUIRE) &
                TP_STATUS_USER) != 0;
    if (r->rx_next != NULL)
        return 1;
    if (r->rx == NULL || r->rx_held == r->rx_block_nr)
        return 0;
    return (__atomic_load_n(&ring_rx_block(r, r->rx_cur)->hdr.bh1.block_status,
                            __ATOMIC_ACQUIRE) & TP_STATUS_USER) != 0;
}

/* Fill out[0..n) with views of up to max ready frames, in arrival order.
 * Views stay valid until ring_rx_release().  Returns n (0: nothing ready). */
/* Read the whole frame behind a TP_STATUS_COPY slot into rx_big; the view
 * points there.  Nothing queued (cannot happen while slots and queue stay
 * in step): the cut view stays, len < wire_len, and is counted. */
static inline void ring_rx_copy(ring_t *r, ring_frame_t *f)
{
    ssize_t got = recv(r->fd, r->rx_big, r->rx_big_size, MSG_DONTWAIT | MSG_TRUNC);
    if (got < (ssize_t)r->vnet) {
        r->rx_copy_lost++;
        return;
    }
    f->vnet = r->vnet ? r->rx_big : NULL;
    f->data = r->rx_big + r->vnet;
    f->wire_len = (uint32_t)got - r->vnet;   /* MSG_TRUNC: the frame's real length */
    f->len = (uint32_t)(got < (ssize_t)r->rx_big_size ? got : (ssize_t)r->rx_big_size) - r->vnet;
    r->rx_copied++;
}

static inline int ring_rx_batch_v2(ring_t *r, ring_frame_t *out, int max)
{
    int n = 0;
    uint32_t units = ring_rx_units(r);
    while (n < max && r->rx_held < units) {
        struct tpacket2_hdr *h = ring_rx_slot(r, r->rx_cur);
        uint32_t st = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
        if (!(st & TP_STATUS_USER))
            break;
        out[n].data = (const uint8_t *)h + h->tp_mac;
        out[n].vnet = r->vnet ? out[n].data - r->vnet : NULL;
        out[n].len = h->tp_snaplen;
        out[n].wire_len = h->tp_len;
        out[n].status = st;
        out[n].vlan_tci = (uint16_t)h->tp_vlan_tci;
        out[n].pkttype = 0;
        n++;
        r->rx_held++;
        r->rx_cur = r->rx_cur + 1 == units ? 0 : r->rx_cur + 1;
        if ((st & TP_STATUS_COPY) && r->rx_big != NULL) {
            /* the whole frame is the next one queued on the socket; one
             * buffer, so it ends the batch (valid until the release) */
            ring_rx_copy(r, &out[n - 1]);
            break;
        }
    }
    r->rx_frames += (uint64_t)n;
    return n;
}

static inline int ring_rx_batch(ring_t *r, ring_frame_t *out, int max)
{
    int n = 0;
    if (r->v2)
        return ring_rx_batch_v2(r, out, max);
    while (n < max) {
        if (r->rx_next == NULL) {
            struct tpacket_block_desc *bd;
            if (r->rx_held == r->rx_block_nr)
                break;
            bd = ring_rx_block(r, r->rx_cur);
            if (!(__atomic_load_n(&bd->hdr.bh1.block_status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
                break;
            r->rx_held++;
            r->rx_blocks++;
            r->rx_left = bd->hdr.bh1.num_pkts;
            if (r->rx_left == 0) {
                r->rx_cur = r->rx_cur + 1 == r->rx_block_nr ? 0 : r->rx_cur + 1;
                continue;
            }
            r->rx_next = (uint8_t *)bd + bd->hdr.bh1.offset_to_first_pkt;
        }
        {
            const struct tpacket3_hdr *h = (const struct tpacket3_hdr *)r->rx_next;
            out[n].data = r->rx_next + h->tp_mac;
            out[n].vnet = r->vnet ? out[n].data - r->vnet : NULL;
            out[n].len = h->tp_snaplen;
            out[n].wire_len = h->tp_len;
            out[n].status = h->tp_status;
            out[n].vlan_tci = (uint16_t)h->hv1.tp_vlan_tci;
            out[n].pkttype = 0;
            n++;
            if (--r->rx_left == 0) {
                r->rx_next = NULL;
                r->rx_cur = r->rx_cur + 1 == r->rx_block_nr ? 0 : r->rx_cur + 1;
            } else {
                r->rx_next += h->tp_next_offset;
            }
        }
    }
    r->rx_frames += (uint64_t)n;
    return n;
}

/* Hand every fully walked block back to the kernel.  The open block (partly
 * walked) stays held.  The release store orders our reads of the block
 * before the kernel sees TP_STATUS_KERNEL. */
static inline void ring_rx_release(ring_t *r)
{
    uint32_t closed = r->rx_held - (r->rx_next != NULL);
    if (r->v2) {
        uint32_t units = ring_rx_units(r);
        while (r->rx_held) {
            __atomic_store_n(&ring_rx_slot(r, r->rx_rel)->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
            r->rx_rel = r->rx_rel + 1 == units ? 0 : r->rx_rel + 1;
            r->rx_held--;
        }
        return;
    }
    while (closed--) {
        struct tpacket_block_desc *bd = ring_rx_block(r, r->rx_rel);
        __atomic_store_n(&bd->hdr.bh1.block_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        r->rx_rel = r->rx_rel + 1 == r->rx_block_nr ? 0 : r->rx_rel + 1;
        r->rx_held--;
    }
}

/* poll() the socket; returns revents (0 on timeout) or -errno. */
static inline int ring_poll(ring_t *r, short events, int timeout_ms)
{
    struct pollfd p;
    int rc;
    p.fd = r->fd;
    p.events = events;
    p.revents = 0;
    rc = poll(&p, 1, timeout_ms);
    if (rc < 0)
        return -errno;
    return rc ? p.revents : 0;
}

/* Wait up to timeout_ms (<0: forever) for a ready RX frame: 1 ready,
 * 0 timeout, -errno (EINTR included, so a signal stops the wait). */
static inline int ring_rx_wait(ring_t *r, int timeout_ms)
{
    int rc;
    if (ring_rx_ready(r))
        return 1;
    rc = ring_poll(r, POLLIN | POLLERR, timeout_ms);
    if (rc < 0)
        return rc;
    return ring_rx_ready(r);
}

/* ---- TX -------------------------------------------------------------- */

/* 1 if the next TX frame is ours to fill. */
static inline int ring_tx_free(ring_t *r)
{
    uint32_t st;
    if (r->tx == NULL)
        return 0;
    st = __atomic_load_n(ring_tx_status(r, r->tx_cur), __ATOMIC_ACQUIRE);
    return st == TP_STATUS_AVAILABLE || (st & TP_STATUS_WRONG_FORMAT);
}

/* Data area of the next free TX frame (room bytes), or NULL if the kernel
 * still owns it (ring full: flush and wait for POLLOUT).  With vnet_hdr the
 * frame's virtio_net_hdr (ring_tx_vnet) is zeroed: no GSO, no checksum
 * offload, unless the caller fills it before commit. */
static inline uint8_t *ring_tx_claim(ring_t *r, uint32_t *room)
{
    uint8_t *p;
    if (!ring_tx_free(r)) {
        r->tx_full++;
        return NULL;
    }
    *room = r->tx_room;
    p = ring_tx_frame(r, r->tx_cur) + r->tx_off;
    if (r->vnet)
        memset(p, 0, r->vnet);
    return p + r->vnet;
}

/* The claimed frame's struct virtio_net_hdr (NULL when vnet_hdr is off). */
static inline uint8_t *ring_tx_vnet(ring_t *r)
{
    if (!r->vnet)
        return NULL;
    return ring_tx_frame(r, r->tx_cur) + r->tx_off;
}

/* Publish the claimed frame with len bytes (len <= room, checked by the
 * caller) and advance. */
static inline void ring_tx_commit(ring_t *r, uint32_t len)
{
    uint8_t *f = ring_tx_frame(r, r->tx_cur);
    if (r->vnet && f[r->tx_off + 1] == 0) {
        /* Not GSO: hdr_len (bytes the kernel copies into the skb; the rest
         * it maps from the ring as zero-copy pages, which a veth or any
         * receive path must then copy again into a fresh page) covers the
         * whole frame, so a plain frame costs one small copy, not a page. */
        uint16_t hl = len > 0xffff ? 0xffff : (uint16_t)len;
        memcpy(f + r->tx_off + 2, &hl, 2);
    }
    if (r->v2) {
        struct tpacket2_hdr *h = (struct tpacket2_hdr *)f;
        h->tp_len = len + r->vnet;
        h->tp_snaplen = len + r->vnet;
    } else {
        struct tpacket3_hdr *h = (struct tpacket3_hdr *)f;
        h->tp_len = len + r->vnet;
        h->tp_snaplen = len + r->vnet;
        h->tp_next_offset = 0;
    }
    __atomic_store_n(ring_tx_status(r, r->tx_cur), TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
    r->tx_cur = r->tx_cur + 1 == r->tx_frame_nr ? 0 : r->tx_cur + 1;
    r->tx_pending++;
    r->tx_frames++;
}

/* One sendto() for every committed frame.  Transient pushback (ENOBUFS,
 * EAGAIN) keeps the frames queued for the next flush and returns 0.
 * Returns the number of frames handed over (as committed), or -errno. */
static inline int ring_tx_flush(ring_t *r)
{
    int n = (int)r->tx_pending;
    if (n == 0)
        return 0;
    if (sendto(r->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0) {
        int e = errno;
        if (e == ENOBUFS || e == EAGAIN || e == EINTR)
            return 0;
        r->tx_errors++;
        return -e;
    }
    r->tx_pending = 0;
    r->tx_flushes++;
    return n;
}

/* Send one frame now, copied once from data (not through the TX ring), with
 * its virtio_net_hdr.  What the TX ring holds is flushed first, so frames
 * leave in the order they were queued.  A full send buffer is waited on for
 * up to 2 ms, then the frame is dropped (tx_dropped).  0, or -errno. */
static inline int ring_tx_direct(ring_t *r, const void *vnet, const uint8_t *data, uint32_t len)
{
    struct iovec iov[2];
    struct msghdr m;
    int tries;
    if (r->dfd < 0)
        return -ENOTSUP;
    if (r->tx_pending)
        ring_tx_flush(r);
    iov[0].iov_base = (void *)vnet;
    iov[0].iov_len = r->vnet;
    iov[1].iov_base = (void *)data;
    iov[1].iov_len = len;
    memset(&m, 0, sizeof(m));
    m.msg_iov = iov;
    m.msg_iovlen = 2;
    for (tries = 0; tries < 2; tries++) {
        if (sendmsg(r->dfd, &m, MSG_DONTWAIT) >= 0) {
            r->tx_frames++;
            r->tx_direct++;
            return 0;
        }
        if (errno != EAGAIN && errno != ENOBUFS && errno != EINTR) {
            r->tx_errors++;
            return -errno;
        }
        r->tx_full++;            /* send buffer full */
        if (tries == 0) {
            struct pollfd p;
            p.fd = r->dfd;
            p.events = POLLOUT;
            p.revents = 0;
            poll(&p, 1, 2);
        }
    }
    r->tx_dropped++;
    return -EAGAIN;
}

/* Wait up to timeout_ms for a free TX frame: 1 free, 0 timeout, -errno. */
static inline int ring_tx_wait(ring_t *r, int timeout_ms)
{
    int rc;
    if (ring_tx_free(r))
        return 1;
    rc = ring_poll(r, POLLOUT | POLLERR, timeout_ms);
    if (rc < 0)
        return rc;
    return ring_tx_free(r);
}

/* ---- counters -------------------------------------------------------- */

/* Read PACKET_STATISTICS (the kernel resets it on read) into the running
 * totals.  tp_packets counts every packet the socket saw, drops included. */
static inline int ring_stats_update(ring_t *r)
{
    struct tpacket_stats_v3 st;
    socklen_t len = sizeof(st);
    memset(&st, 0, sizeof(st));
    if (getsockopt(r->fd, SOL_PACKET, PACKET_STATISTICS, &st, &len) < 0)
        return -errno;
    r->k_packets += st.tp_packets;
    r->k_drops += st.tp_drops;
    r->k_freeze += st.tp_freeze_q_cnt;
    return 0;
}

#endif
