"""Two datapath workers in memory (Agent(workers=2)'s layout): node1 and the gateway
node3 each run two Datapaths over one egress map, each Datapath with its own NAT
table over its slice of the port range (egresscore.agent.workers), and every
frame goes to the worker the fanout program names (egresscore._steer, run in the
classic-BPF interpreter) as the kernel would: the pod veth's program on node1,
the underlay's on node3 (VXLAN from node1, replies from the server).  Replies
come back to the worker that made the mapping, and endpoint-independent mapping
holds per (pod IP, pod port) across workers."""
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from test_datapath import APP1, APP1_HOST, APP1_MAC, MAC, NODES, ROUTER_MAC, SERVER, check, egress_map

from egresscore import Datapath
from egresscore._bpf import bpf_run
from egresscore._steer import steer_pod, steer_underlay, worker_slices
from egresscore.agent.workers import DatapathGroup, make_nat

NAT = (32768, 65534)
SLICES = worker_slices(*NAT, 2)
OTHER = "203.0.113.20"


def workers(view, n=2, pod_mac=APP1_MAC):
    ip = {"node1": "192.168.1.1", "node3": "192.168.1.3"}[view]
    em = egress_map(view)
    nat = make_nat(n, NAT, None, "test", capacity=4096)
    dps = []
    for table in nat.members:
        table.add_egress_ip(ip)
        dp = Datapath(ip, MAC[ip], em, table, nat_port_range=NAT)
        for i, (nip, cidr) in enumerate(NODES):
            dp.add_node(i, nip, [cidr], MAC[nip])
        dp.set_router(ROUTER_MAC)
        if view == "node1":
            dp.add_pod_port(1, APP1, APP1_HOST, pod_mac)
        dps.append(dp)
    return DatapathGroup(dps), nat


def steer(prog, frame, group):
    w = bpf_run(prog, frame, fanout=True) % len(group.members)
    return w, group.members[w]


def send(group, prog, frame, port):
    w, dp = steer(prog, frame, group)
    out = dp.process_frames(frame, port)
    return w, out


def test_replies_come_back_to_the_owning_worker_and_eim_holds():
    n1, _ = workers("node1")
    n3, nat3 = workers("node3")
    pod_prog, under_prog = steer_pod(2), steer_underlay(2, NAT)
    owners, mapped = set(), {}
    for proto in (TCP, UDP):
        for sport in range(20000, 20024):
            for server in (SERVER, OTHER):
                l4 = proto(sport=sport, dport=80) if proto is TCP else proto(sport=sport, dport=53)
                if proto is TCP:
                    l4.flags = "S"
                frame = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=server) / l4)
                _, out = send(n1, pod_prog, frame, 1)          # node1: into the tunnel to node3
                assert len(out) == 1 and out[0][0] == 0
                w3, out = send(n3, under_prog, out[0][1], 0)     # node3: SNAT to the egress IP
                assert len(out) == 1 and out[0][0] == 0
                snat = check(out[0][1])
                assert snat[IP].src == "192.168.1.3"
                eport = snat[proto].sport
                lo, hi = SLICES[w3]
                assert lo <= eport <= hi, (w3, eport)          # the worker's own slice
                # endpoint-independent: one external port per (pod IP, pod port, protocol)
                assert mapped.setdefault((proto, sport), (w3, eport)) == (w3, eport)
                owners.add(w3)
                # the reply: steered by its port to the worker that mapped it, translated back
                rl4 = proto(sport=snat[proto].dport, dport=eport)
                if proto is TCP:
                    rl4.flags = "SA"
                reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=server, dst="192.168.1.3")
                              / rl4)
                wr, out = send(n3, under_prog, reply, 0)
                assert wr == w3
                assert len(out) == 1, n3.counters()["drops"]
                back = check(out[0][1])
                assert back[IP].dst == "192.168.1.1"              # VXLAN back to node1
    assert owners == {0, 1}, "the steering kept every pod port on one worker"
    c = n3.counters()
    assert c["reverse_nat"] == 2 * 24 * 2 and c["snat_egress"] == 2 * 24 * 2 and not c["drops"]
    per = [len(t) for t in nat3.members]
    assert sum(per) == len(nat3) == 2 * 24 * 2 and min(per) > 0


def test_a_pod_mac_one_worker_learns_delivers_replies_at_the_other():
    """The agent adds pod ports without their MAC (learned from the pod's
    frames): a reply steered to another worker than the pod's frame went to
    (the VXLAN from the gateway by its inner source: the server) is still
    delivered, with the MAC the first worker learned (issue 17: it was
    dropped as no_route until the pod happened to send through that worker)."""
    pod_prog, under_prog = steer_pod(2), steer_underlay(2, NAT)
    crossed = set()
    for sport in range(20000, 20064):
        n1, _ = workers("node1", pod_mac=None)      # a fresh node1: no MAC learned yet
        n3, _ = workers("node3")
        syn = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER) / TCP(sport=sport, dport=80,
                                                                                         flags="S"))
        w1, out = send(n1, pod_prog, syn, 1)
        _, out = send(n3, under_prog, out[0][1], 0)
        snat = check(out[0][1])
        reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER, dst="192.168.1.3")
                      / TCP(sport=80, dport=snat[TCP].sport, flags="SA"))
        _, out = send(n3, under_prog, reply, 0)          # back into the tunnel to node1
        wr, out = send(n1, under_prog, out[0][1], 0)
        assert len(out) == 1 and out[0][0] == 1, (w1, wr, n1.members[wr].counters()["drops"])
        back = Ether(out[0][1])
        assert back.dst == APP1_MAC and back.src == APP1_HOST and back[IP].dst == APP1
        crossed.add(w1 != wr)
    assert crossed == {True, False}, "the steering never split a pod's frame and its reply"


def test_a_reply_at_the_wrong_worker_is_not_translated():
    """The partitions are real: worker 1's table has no entry worker 0 made."""
    n3, _ = workers("node3")
    under_prog = steer_underlay(2, NAT)
    vx = None
    n1, _ = workers("node1")
    for sport in range(20000, 20100):
        frame = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER) / UDP(sport=sport, dport=53))
        _, out = send(n1, steer_pod(2), frame, 1)
        if steer(under_prog, out[0][1], n3)[0] == 0:
            vx = out[0][1]
            break
    _, out = send(n3, under_prog, vx, 0)
    eport = check(out[0][1])[UDP].sport
    reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER, dst="192.168.1.3")
                  / UDP(sport=53, dport=eport))
    assert n3.members[1].process_frames(reply, 0) == []
    assert n3.members[1].counters()["drops"] == {"no_nat_entry": 1}
    assert len(n3.members[0].process_frames(reply, 0)) == 1


def test_echo_and_its_reply_meet_at_one_worker():
    n3, _ = workers("node3")
    n1, _ = workers("node1")
    pod_prog, under_prog = steer_pod(2), steer_underlay(2, NAT)
    seen = set()
    for ident in range(40, 60):
        frame = bytes(Ether(src=APP1_MAC, dst=APP1_HOST) / IP(src=APP1, dst=SERVER) / ICMP(type=8, id=ident))
        _, out = send(n1, pod_prog, frame, 1)
        w, out = send(n3, under_prog, out[0][1], 0)
        req = check(out[0][1])
        reply = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER, dst="192.168.1.3")
                      / ICMP(type=0, id=req[ICMP].id, seq=req[ICMP].seq))
        wr, out = send(n3, under_prog, reply, 0)
        assert wr == w and len(out) == 1
        seen.add(w)
    assert seen == {0, 1}


def test_group_sums_counters_and_writes_every_member():
    g, nat = workers("node3")
    g.set_router("02:00:00:00:00:99")
    assert g.counters()["rx"] == 0
    frame = bytes(Ether(src=ROUTER_MAC, dst=MAC["192.168.1.3"]) / IP(src=SERVER, dst="192.168.1.3")
                  / UDP(sport=53, dport=40000))
    for dp in g.members:
        dp.process_frames(frame, 0)
    assert g.counters()["rx"] == 2 and g.counters()["drops"] == {"no_nat_entry": 2}
    use = nat.port_usage()["192.168.1.3"]["udp"]
    assert use == (0, NAT[1] - NAT[0] + 1)


def test_bad_worker_counts_are_refused_before_anything_starts():
    import pytest

    from egresscore import Agent
    from egresscore.cli import main

    for bad in (0, 65, True, "2"):
        with pytest.raises(ValueError, match="workers must be an integer in 1..64"):
            Agent("node1", None, (), workers=bad)
    with pytest.raises(ValueError, match="stateful_failover replicates one NAT table"):
        Agent("node1", None, (), workers=2, stateful_failover=True)
    with pytest.raises(SystemExit):
        main(["agent", "--node", "node1", "--cluster", "x.yaml", "--workers", "0"])


def test_state_files_of_another_worker_count_are_set_aside(tmp_path, capsys):
    from egresscore.agent.workers import worker_state_paths

    base = str(tmp_path / "node3.nat")
    for name in ("node3.nat", "node3.0of3.nat", "node3.1of2.nat"):
        (tmp_path / name).write_bytes(b"x")
    assert worker_state_paths(base, 2, "t") == [str(tmp_path / "node3.0of2.nat"), str(tmp_path / "node3.1of2.nat")]
    err = capsys.readouterr().err
    assert err.count("saved by an agent with another worker count") == 2
    assert (tmp_path / "node3.1of2.nat").exists()                  # this count's own: adopted
    assert (tmp_path / "node3.nat.other-workers").exists() and not (tmp_path / "node3.nat").exists()
    assert (tmp_path / "node3.0of3.nat.other-workers").exists()
    assert worker_state_paths(None, 2, "t") == [None, None]
