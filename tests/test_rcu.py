"""The LPM / egress map read sections (lpm_core.h, issue 17): per-thread
reader slots, one section per datapath batch, grace periods.

A writer's grace period (lpm_rcu_sync) must wait for a reader held inside a
section that can still see the table being replaced, return once that
reader leaves, and never wait for readers that are registered but idle
(outside any section between batches).  The scenarios that could crash (a
table freed under a reader: its arrays are munmapped) or hang (a writer
waiting for ever, with the GIL held) run in a child interpreter with a
timeout, so they fail as a test instead of taking pytest down."""
import os
import subprocess
import sys
import textwrap
import threading

import egresscore._core as core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(code, timeout=120):
    """Run `code` in a fresh interpreter from the worktree root; its stdout lines."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"child exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr[-3000:]}"
    return p.stdout.split()


# A trie big enough that its direct array is an mmap of its own (>= 64 KiB:
# egc_alloc_big), so a read of a freed table faults instead of reading stale
# heap, and the helpers the child scripts share.
PRELUDE = """
    import os, threading, time
    import numpy as np
    import egresscore._core as core

    def big_trie(value):
        t = core.LPMTrie(4)
        nets = (np.arange(20000, dtype=np.uint32) << 8) + (10 << 24)      # 10.0.0.0/24, 10.0.1.0/24, ...
        t.update_arrays(nets, np.full(20000, 24, np.uint8), np.full(20000, value, np.uint32))
        return t

    ADDR = (10 << 24) | (7 << 8) | 9                                       # 10.0.7.9 in 10.0.7.0/24
"""


def test_sync_waits_for_a_reader_held_in_its_section_and_returns_when_it_leaves():
    """A reader thread loads the published table, then stays in its section
    for 0.4 s and looks up again in that same table: the writer's full
    rebuild (publish, grace period, free) must not free it before the reader
    leaves (the second lookup would fault or read garbage), and must finish
    after the reader left."""
    out = run_child(PRELUDE + """
    t = big_trie(1)
    assert t.lookup("10.0.7.9") == 1
    r, w = os.pipe()
    res = {}
    th = threading.Thread(target=lambda: res.update(v=core._rcu_hold_lookup(t, ADDR, w, 0.4)))
    th.start()
    assert os.read(r, 1) == b"x"                    # the reader is inside, holding the old table
    assert t.readers == 1
    t.update_arrays(np.array([ADDR & ~0xff], np.uint32), np.array([24], np.uint8), np.array([2], np.uint32))
    done = time.monotonic_ns()                      # publish + grace period + free returned
    th.join()
    v1, v2, left = res["v"]
    print(v1, v2, int(done >= left), t.lookup("10.0.7.9"), t.readers)
    """)
    assert out == ["1", "1", "1", "2", "0"], out


def test_egress_map_write_waits_for_a_held_reader():
    """The same for the egress map: a source's rows replaced while a reader
    is held in a section return only after it left (its lookups are in the
    same read-side domain as every trie's)."""
    out = run_child(PRELUDE + """
    em = core.EgressMap()
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.2")
    t = big_trie(1)
    r, w = os.pipe()
    res = {}
    th = threading.Thread(target=lambda: res.update(v=core._rcu_hold_lookup(t, ADDR, w, 0.3)))
    th.start()
    os.read(r, 1)
    em.set("10.0.1.93", "203.0.113.0/24", "192.168.1.100", "192.168.1.3")
    done = time.monotonic_ns()
    th.join()
    print(int(done >= res["v"][2]), em.lookup("10.0.1.93", "203.0.113.9").gateway_ip)
    """)
    assert out == ["1", "192.168.1.3"], out


def test_idle_registered_readers_do_not_block_writers():
    """Readers that entered sections and are now idle: a thread that looked
    up once and waits on an event, a Datapath that ran batches on a thread
    now parked, a Datapath never run.  Writers (full rebuilds, egress map
    changes, node changes) all complete."""
    out = run_child(PRELUDE + """
    import sys
    sys.path.insert(0, "tests")
    from test_datapath import from_app1, SERVER
    from test_datapath_batch import NOW, run_batch, twin
    from scapy.layers.inet import UDP
    t = big_trie(1)
    park = threading.Event()
    ran = [threading.Event(), threading.Event()]
    dp = twin("node1")
    never = twin("node3")

    def idle_lookup():
        t.lookup("10.0.7.9")
        t.lookup_batch(np.array([ADDR], np.uint32))
        ran[0].set()
        park.wait()

    def idle_worker():
        run_batch(dp, [from_app1((SERVER, UDP(sport=1, dport=7)))] * 8, 1)
        ran[1].set()
        park.wait()

    ths = [threading.Thread(target=idle_lookup), threading.Thread(target=idle_worker)]
    for th in ths:
        th.start()
    for ev in ran:
        ev.wait()
    owned, _ = core._rcu_slots()                     # both threads hold a slot, idle
    for i in range(50):
        t.update_arrays(np.array([ADDR & ~0xff], np.uint32), np.array([24], np.uint8), np.array([i], np.uint32))
        dp.egress_map.set("10.0.1.93", "198.51.100.0/24", "192.168.1.100", ("192.168.1.2", "192.168.1.3")[i % 2])
        never.add_node(5, "192.168.1.5", [f"10.0.{5 + i}.0/24"], "02:00:00:00:05:05")
        never.remove_node(5)
    print(t.lookup("10.0.7.9"), int(owned >= 2), t.readers)
    park.set()
    for th in ths:
        th.join()
    """, timeout=180)
    assert out == ["49", "1", "0"], out


def test_each_thread_reads_on_its_own_cache_line_and_gives_it_back():
    """Two threads' slots are distinct 64-byte lines; a thread's slot is the
    same for all its sections; slots of exited threads are reused, so the
    registry does not grow with threads that came and went."""
    mine = core._rcu_slot()
    assert core._rcu_slot() == mine
    got = []
    barrier = threading.Barrier(2)

    def reader():
        got.append(core._rcu_slot())
        barrier.wait()                      # both alive: no reuse between them

    ths = [threading.Thread(target=reader) for _ in range(2)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    slots = got + [mine]
    assert len(set(slots)) == 3 and all(s % 64 == 0 for s in slots), slots
    assert min(abs(a - b) for i, a in enumerate(slots) for b in slots[i + 1:]) >= 64
    _, total = core._rcu_slots()
    for _ in range(100):                    # short-lived readers, one after another
        th = threading.Thread(target=core._rcu_slot)
        th.start()
        th.join()
    owned, total2 = core._rcu_slots()
    assert total2 <= total + 1, (total, total2)
    assert owned <= total2


def test_sections_nest_and_leave():
    """Nested sections (a lookup API called inside the datapath's section)
    leave the slot inside until the outermost one ends."""
    assert core._rcu_section(1) == (True, False)
    assert core._rcu_section(3) == (True, False)
    t = core.LPMTrie(4)
    t["10.0.0.0/8"] = 5
    assert t.lookup("10.1.2.3") == 5 and t.readers == 0


def test_forked_child_writes_although_a_parent_thread_was_reading():
    """fork() while another thread is inside a section: that thread does not
    exist in the child, whose writers must not wait for it."""
    out = run_child(PRELUDE + """
    t = big_trie(1)
    r, w = os.pipe()
    th = threading.Thread(target=core._rcu_hold_lookup, args=(t, ADDR, w, 1.5))
    th.start()
    os.read(r, 1)
    pid = os.fork()
    if pid == 0:
        t.update_arrays(np.array([ADDR & ~0xff], np.uint32), np.array([24], np.uint8), np.array([3], np.uint32))
        os._exit(0 if t.lookup("10.0.7.9") == 3 and t.readers == 0 else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        status = -1
    th.join()
    print(status)
    """)
    assert out == ["0"], out
