"""A large full compile leaves its containers out of the cyclic GC's generations (gc.freeze).

Built with the collector paused, they would all be young at once, and the
next generation-1 and generation-2 collections, started by some later
single change, would scan them (0.3 s and 0.7 s pauses at 100,000 pods).
"""
import gc
import sys
import threading
import weakref

from egresscore import compiler as compiler_mod
from egresscore.cluster import Cluster, Interface, Node, Pod
from egresscore.compiler import Compiler
from egresscore.policy import parse_policy

POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumEgressGatewayPolicy", "metadata": {"name": "p"},
          "spec": {"selectors": [{"podSelector": {"matchLabels": {"app": "a"}}}],
                   "destinationCIDRs": ["203.0.113.0/24"],
                   "egressGateway": {"nodeSelector": {"matchLabels": {"gw": "yes"}}, "egressIP": "192.168.1.3"}}}


def _compiler(n_pods):
    nodes = [Node("node3", {"gw": "yes"}, "192.168.1.3", (Interface("eth0", ("192.168.1.3/24",)),), "eth0")]
    pods = [Pod(f"p{i}", "default", f"u{i}", {"app": "a"}, (f"10.0.{i // 250}.{1 + i % 250}",), "node3")
            for i in range(n_pods)]
    return Compiler(Cluster(nodes, (), pods), [parse_policy(POLICY)[0]], node="node3")


def _tracked(obj):
    return any(o is obj for o in gc.get_objects())


def test_a_large_full_compile_is_frozen_a_small_one_is_not(monkeypatch):
    gc.collect()
    gc.unfreeze()
    try:
        monkeypatch.setattr(compiler_mod, "FREEZE_AFTER", 100)
        small = _compiler(20)            # 20 entries + 20 pods: under the limit
        assert gc.get_freeze_count() == 0
        assert _tracked(small._matched["p"]), "a small compile's containers stay young"
        big = _compiler(60)              # 120: over it
        assert gc.get_freeze_count() > 0
        assert not _tracked(big._matched["p"]), "a large compile's containers are out of the generations"
        assert big.desired and gc.isenabled()
        # frozen objects are still freed by reference counting when a change drops them
        ref = weakref.ref(big.cluster.pods["u0"])
        big.remove_pod(uid="u0")
        assert ref() is None and all(k[0] != "10.0.0.1" for k in big.desired)
    finally:
        gc.unfreeze()


def test_the_per_pod_state_a_change_leaves_is_not_scanned_by_the_collector():
    """What each pod change leaves per pod (the map keys a writer wrote, the policies of a pod) is
    tuples of strings: the collector stops tracking them at their first collection, so changes do not
    grow what every later collection scans."""
    c = _compiler(5)
    c.upsert_pod(Pod("new", "default", "u-new", {"app": "a"}, ("10.0.9.9",), "node3"))
    owned = [v for (pname, order), v in c._owned.items() if order[2] == "u-new"]
    policies = c._pod_policies["u-new"]
    assert owned and owned[0] and policies == ("p",)
    gc.collect()
    assert not gc.is_tracked(owned[0]) and not gc.is_tracked(policies)
    assert not any(gc.is_tracked(k) for k in owned[0])
    c.remove_pod(uid="u-new")
    assert "u-new" not in c._pod_policies and all(order[2] != "u-new" for _, order in c._owned)



def test_the_entries_a_change_writes_are_not_scanned_by_the_collector():
    """An EgressEntry (a tuple subclass) and the tuples holding it are never untracked by CPython on its
    own, and a frozen compile leaves the pods' order tuples tracked: the entries a change writes, their
    contributions and writers are taken out of the collector (egresscore._gcpause.untrack), so a policy
    edit or a pod change does not grow what every generation-2 collection scans."""
    gc.collect()
    gc.unfreeze()
    try:
        c = _compiler(5)
        gc.freeze()     # as after a large compile: the pods' (namespace, name, uid) tuples frozen, tracked
        c.upsert_pod(Pod("new", "default", "u-new", {"app": "a"}, ("10.0.9.9",), "node3"))
        edited = parse_policy({**POLICY, "spec": {**POLICY["spec"], "destinationCIDRs": ["198.51.100.0/24"]}})[0]
        c.upsert_policy(edited)
        keys = [k for k in c.desired if k[1] == "198.51.100.0/24"]
        assert len(keys) == 6
        for key in keys:
            writer, entry = c._contrib[key]
            assert entry is c.desired[key]
            assert not gc.is_tracked(entry) and not gc.is_tracked(c._contrib[key]) and not gc.is_tracked(writer)
        # and are let go with the change that drops them (reference counting frees them)
        entry = c.desired[("10.0.9.9", "198.51.100.0/24")]
        c.remove_pod(uid="u-new")
        assert sys.getrefcount(entry) == 2   # this test's name and the call's argument only
    finally:
        gc.unfreeze()


def test_a_pod_added_after_a_collection_leaves_the_name_index_untracked():
    """A collection untracks the pod table's name index ((namespace, name) -> uid: strings and tuples
    of them).  Inserting one tracked key would track it again, in generation 0, and every later
    collection (a generation-0 one too) would scan all its entries: 5 ms a pass at 100,000 pods,
    in each of 20 agents at once.  A new pod's key goes in untracked, so the index stays out."""
    c = _compiler(50)
    pods = c.cluster.pods
    gc.collect()
    assert not gc.is_tracked(pods._named), "the premise: a collection untracks the index"
    c.upsert_pod(Pod("new", "default", "u-new", {"app": "a"}, ("10.0.9.9",), "node3"))
    c.upsert_pod(Pod("p3", "default", "u-again", {"app": "a"}, ("10.0.9.10",), "node3"))   # a name shared
    assert not gc.is_tracked(pods._named)
    assert pods["default", "new"].uid == "u-new" and [p.uid for p in pods.named("default", "p3")] == ["u3", "u-again"]
    c.remove_pod(uid="u3")
    assert pods["default", "p3"].uid == "u-again" and not gc.is_tracked(pods._named)


def test_overlapping_pauses_restore_the_collector_once_the_last_ends():
    """Two threads' builds overlapping (A in, B in, A out, B out): the GC stays off until B ends, is on
    after it, and a freeze asked by A happens when the last one ends, not under B's feet."""
    from egresscore._gcpause import gc_paused

    gc.collect()
    gc.unfreeze()
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def thread_a():
        with gc_paused(freeze=True):
            a_in.set()
            b_in.wait(5)
        seen["after_a"] = (gc.isenabled(), gc.get_freeze_count())
        a_out.set()

    try:
        t = threading.Thread(target=thread_a)
        t.start()
        assert a_in.wait(5)
        with gc_paused():
            b_in.set()
            assert a_out.wait(5)
            assert not gc.isenabled()
        t.join(5)
        assert seen["after_a"] == (False, 0), "A ending must neither enable the GC nor freeze while B builds"
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()
        gc.unfreeze()


def test_an_agent_heap_frozen_at_start_is_not_scanned_by_later_passes_and_the_watch_counts_them():
    """freeze_heap (Agent.run, before the loop): what start-up built leaves generation 2, so a
    later gen-2 pass (which holds the GIL) does not scan it; not while a build pauses the GC."""
    from egresscore._gcpause import freeze_heap, gc_paused, gc_watch

    watch = gc_watch()
    built = [[i] for i in range(10_000)]            # start-up state: containers, no cycles
    gc.unfreeze()
    try:
        with gc_paused():
            assert freeze_heap() is False and gc.get_freeze_count() == 0
        assert freeze_heap() is True
        assert gc.get_freeze_count() >= len(built) and watch.count == [0, 0, 0]   # its own pass not counted
        gc.collect()
        assert watch.count[2] == 1 and watch.stats()["frozen"] >= len(built)
        assert not any(o is built[0] for o in gc.get_objects(2))
        assert built[0] == [0]                       # still alive, still reachable
    finally:
        gc.unfreeze()

