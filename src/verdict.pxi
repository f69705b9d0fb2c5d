# The datapath's one registry of verdicts and drop reasons.
#
# Every packet ends with a verdict: forwarded somewhere, or dropped with one of
# these reasons.  Codes are stable (they appear in counters, flow logs and
# metrics): append new reasons at the end, never renumber.

cdef enum Verdict:
    VERDICT_PASS = 0            # hand to the kernel / leave alone
    VERDICT_TX = 1              # queued for transmit on the underlay
    VERDICT_TX_LOCAL = 2        # delivered to a local pod
    VERDICT_DROP = 3            # dropped: see the reason

cdef enum DropReason:
    DROP_NONE = 0
    DROP_MALFORMED = 1          # truncated or inconsistent headers
    DROP_UNSUPPORTED = 2        # protocol or feature the datapath does not handle
    DROP_TTL_EXCEEDED = 3
    DROP_NO_GATEWAY = 4         # a policy matched but no gateway node exists
    DROP_NO_EGRESS_IP = 5       # this node is the gateway but has no egress IP
    DROP_NAT_EXHAUSTED = 6      # no free SNAT port for the egress IP
    DROP_NAT_TABLE_FULL = 7     # connection table at capacity
    DROP_NO_NAT_ENTRY = 8       # reply with no connection (unsolicited inbound)
    DROP_BAD_VXLAN = 9          # VXLAN flags, VNI or port invalid
    DROP_NOT_CLUSTER_NODE = 10  # VXLAN from a host that is not a cluster node
    DROP_POLICY_DENIED = 11     # source pod not allowed this gateway
    DROP_FRAG_NEEDED = 12       # too big for the underlay with DF: ICMP sent
    DROP_FRAGMENT = 13          # non-first fragment (no ports to translate)
    DROP_CSUM = 14              # checksum invalid
    DROP_NO_ROUTE = 15          # no neighbour / route for the next hop
    DROP_TX_FULL = 16           # transmit ring had no free frame
    DROP_SPOOFED = 17           # pod sent with a source address that is not its own
    DROP_TRUNCATED = 18         # received cut short: larger than the RX ring's frame slot
    DROP_POD_CONN_LIMIT = 19    # new connection refused: its source pod holds its limit
    DROP_REASON_MAX = 20

DROP_REASON_NAMES = (
    "none", "malformed", "unsupported", "ttl_exceeded", "no_gateway",
    "no_egress_ip", "nat_exhausted", "nat_table_full", "no_nat_entry",
    "bad_vxlan", "not_cluster_node", "policy_denied", "frag_needed",
    "fragment", "bad_checksum", "no_route", "tx_full", "spoofed", "truncated",
    "pod_conn_limit",
)
