"""The ring plan: which AF_PACKET ring each of an agent's interfaces gets, and its sizes.

"latency" (the default): TPACKET_V2 RX slots, each frame handed over as it
lands.  "batch": TPACKET_V3 blocks handed over when full or after 1 ms: fewer
wake-ups per packet, but a sparse flow's frames (TCP's ACKs, a request) wait
for the timer at every hop.  Latency slots hold one MTU-sized frame (2 KiB
at MTU 1500), so a ring holds thousands of small frames and absorbs the
burst that piles up while the datapath thread waits for a core; with
PACKET_VNET_HDR a TSO/GSO super-packet (up to 64 KiB) does not fit and
arrives whole through the socket instead (PacketRing rx_copy_size).  The
underlay and each pod veth get 32 MiB (16,384 slots with vnet_hdr: 164 ms
of a 100 kpps stream, 68 ms at 240 kpps of 64-byte frames), the tunnel
offload device a TX ring only (a pod ring's size is an agent option,
pod_ring_mib / --pod-ring-mib: a node with many pods may want less).  Why that much: a datapath thread at
SCHED_FIFO can still be kept off both cores for 50-100 ms (the kernel's fair
server runs starved normal tasks for up to 50 ms of every second on a CPU
full of real-time work; measured: node1's pod ring of 8,192 slots overflowed
in an 86 ms gap under a paced 100 kpps stream).  The cost: 32 MiB of kernel
memory per pod ring (rx_slots() says how many frames a ring holds).
"""
from .._core import PacketRing

RING_MODES = ("latency", "batch")  # RX rings: TPACKET_V2 slots / TPACKET_V3 blocks
DEFAULT_RX_COALESCE_US = 100  # the loop's nap under dense traffic (Datapath.rx_coalesce_us)
SUPER_PACKET = 69632  # a 64 KiB GSO super-packet, its headers and virtio_net_hdr
UNDERLAY_BLOCKS = 32  # RX blocks per ring (1 MiB each with vnet_hdr)
POD_RING_MIB = 32  # a pod veth's RX ring, MiB of kernel memory (16,384 frames at MTU 1500)
POD_RING_MIB_MAX = 1024


class RingPlan:
    """Ring options for one agent (vnet_hdr, MTU, ring mode); opens its rings."""

    def __init__(self, *, vnet_hdr=True, mtu=1500, ring_mode="latency", pod_ring_mib=POD_RING_MIB):
        if ring_mode not in RING_MODES:
            raise ValueError(f"ring_mode must be one of {', '.join(RING_MODES)}, not {ring_mode!r}")
        if (not isinstance(pod_ring_mib, int) or isinstance(pod_ring_mib, bool)
                or not 1 <= pod_ring_mib <= POD_RING_MIB_MAX):
            raise ValueError(f"pod_ring_mib must be an integer in 1..{POD_RING_MIB_MAX} (MiB of kernel memory "
                             f"per pod RX ring), not {pod_ring_mib!r}")
        self.vnet_hdr = bool(vnet_hdr)
        self.ring_mode = ring_mode
        frame = max(2048, (mtu + 256 + 15) & ~15)  # one MTU-sized frame, its tpacket and vnet headers
        block = 1 << 20 if vnet_hdr else 1 << 18
        self.pod_blocks = pod_ring_mib * (1 << 20) // block
        self.options = {"vnet_hdr": self.vnet_hdr, "block_size": block,
                        "tx_frame_size": SUPER_PACKET if vnet_hdr else frame}
        if ring_mode == "latency":
            self.options["rx_frame_size"] = frame
            if vnet_hdr:
                self.options["rx_copy_size"] = SUPER_PACKET
        else:
            self.options["retire_ms"] = 1

    def rx_slots(self, kind):
        """Frames an RX ring of `kind` ("underlay" or "pod") holds (latency mode: one per slot)."""
        blocks = {"underlay": UNDERLAY_BLOCKS, "pod": self.pod_blocks}[kind]
        return blocks * self.options["block_size"] // self.options.get("rx_frame_size", self.options["block_size"])

    def underlay(self, ifname, **fanout):
        """The underlay's RX/TX ring (eth0): VXLAN, SNATed traffic and replies
        (`fanout`: PacketRing's fanout options, egresscore.agent.workers)."""
        return PacketRing(ifname, ignore_outgoing=True, block_count=UNDERLAY_BLOCKS, tx_frames=128,
                          **self.options, **fanout)

    def pod(self, ifname, **fanout):
        """A pod veth's RX/TX ring."""
        return PacketRing(ifname, ignore_outgoing=True, block_count=self.pod_blocks, tx_frames=64,
                          **self.options, **fanout)

    def tunnel(self, ifname):
        """The TX ring on the tunnel offload device (egresscore.agent.tunnel): super-packets whole."""
        return PacketRing(ifname, rx=False, tx_frames=64, vnet_hdr=True, tx_frame_size=self.options["tx_frame_size"])
