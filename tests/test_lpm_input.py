"""Bad input at the LPMTrie boundary: a TypeError/ValueError that names the
input, never a crash, and the trie unchanged."""
import ipaddress

import numpy as np
import pytest

from egresscore import LPM_MAX_VALUE, LPMTrie

MALFORMED_V4 = [
    "10.0.0.0/33", "10.0.0/8", "300.1.1.1/8", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/8/9",
    "", "/8", "abc", "1.2.3.4\x00", "1.2.3.4\x00/8", " 10.0.0.0/8", "10.0.0.0/ 8", "10.0.0.0/+8",
    "10.0.0.0/0008", "1.2.3.4.5", "01.2.3.4", "10.0.0.0/8 ", "é.1.1.1", "1" * 200,
]
MALFORMED_V6 = ["::/129", "2001:db8::/", "2001:db8:::/32", "2001:db8::g/64", "1:2:3:4:5:6:7:8:9/64"]


@pytest.mark.parametrize("bad", MALFORMED_V4)
def test_malformed_ipv4_prefixes(bad):
    t = LPMTrie(4, {"10.0.0.0/8": 1})
    with pytest.raises(ValueError) as e:
        t[bad] = 1
    assert repr(bad)[:40] in str(e.value)
    with pytest.raises((ValueError, TypeError)):
        t.lookup(bad)
    assert t.items() == [(ipaddress.ip_network("10.0.0.0/8"), 1)]


@pytest.mark.parametrize("bad", MALFORMED_V6)
def test_malformed_ipv6_prefixes(bad):
    t = LPMTrie(6)
    with pytest.raises(ValueError, match="not a valid"):
        t[bad] = 1
    assert len(t) == 0


@pytest.mark.parametrize("bad", [("10.0.0.0", -1), ("10.0.0.0", 2**70), ("10.0.0.0", 33), ("10.0.0.0", "8"),
                                 ("10.0.0.0", True), ("10.0.0.0", 8, 1)])
def test_bad_prefix_tuples(bad):
    with pytest.raises(ValueError) as e:
        LPMTrie(4)[bad] = 1
    assert repr(bad) in str(e.value)


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.1.2.3/24", ("10.0.0.1", 31), "2001:db8::1/64"])
def test_host_bits_set_are_rejected_with_the_fix(bad):
    t = LPMTrie(6 if ":" in str(bad) else 4)
    with pytest.raises(ValueError, match="host bits set") as e:
        t[bad] = 1
    assert repr(bad) in str(e.value) and "did you mean" in str(e.value)
    assert len(t) == 0


def test_host_bits_rejected_for_network_objects_too():
    t = LPMTrie(4)
    with pytest.raises(TypeError, match="interface"):
        t[ipaddress.ip_interface("10.0.0.1/8")] = 1


def test_wrong_family():
    t4, t6 = LPMTrie(4), LPMTrie(6)
    with pytest.raises(ValueError, match=r"'2001:db8::/32' is an IPv6 prefix .* IPv4"):
        t4["2001:db8::/32"] = 1
    with pytest.raises(ValueError, match="IPv4"):
        t6["10.0.0.0/8"] = 1
    with pytest.raises(ValueError, match="IPv6 address"):
        t4.lookup("::1")
    with pytest.raises(ValueError, match="IPv4 address"):
        t6.lookup(ipaddress.ip_address("10.0.0.1"))
    with pytest.raises(ValueError, match="out of range"):
        t4.lookup(2**32)
    with pytest.raises(ValueError, match="family"):
        LPMTrie(5)
    with pytest.raises(ValueError, match="family"):
        LPMTrie("4")


@pytest.mark.parametrize("bad", [None, 1.5, [1], object(), b"\x01\x02\x03"])
def test_wrong_key_types(bad):
    t = LPMTrie(4)
    with pytest.raises(TypeError) as e:
        t[bad] = 1
    assert type(bad).__name__ in str(e.value)
    with pytest.raises(TypeError):
        t.lookup(bad)


@pytest.mark.parametrize("value", [-1, LPM_MAX_VALUE + 1, 2**64, "x", 1.0, None, True])
def test_bad_values(value):
    t = LPMTrie(4)
    with pytest.raises((TypeError, ValueError)) as e:
        t["10.0.0.0/8"] = value
    assert repr(value) in str(e.value)
    with pytest.raises((TypeError, ValueError)):
        t.update({"10.0.0.0/8": value})
    assert len(t) == 0


def test_update_is_all_or_nothing():
    t = LPMTrie(4, {"10.0.0.0/8": 1})
    with pytest.raises(ValueError, match="10.0.0.1/24"):
        t.update([("11.0.0.0/8", 2), ("10.0.0.1/24", 3)])
    with pytest.raises(TypeError, match="pairs"):
        t.update(["11.0.0.0/8"])
    assert t.items() == [(ipaddress.ip_network("10.0.0.0/8"), 1)]


@pytest.mark.parametrize("keys, exc, word", [
    (np.zeros(4, np.int64), TypeError, "int64"),
    (np.zeros(4, np.float64), TypeError, "float64"),
    (np.zeros((2, 2), np.uint32), ValueError, "1-dimensional"),
    (np.zeros(4, ">u4"), TypeError, ">u4"),
    ([1, 2, -3], TypeError, "uint32"),
    ("10.0.0.1", TypeError, "uint32"),
])
def test_ipv4_batch_bad_arrays(keys, exc, word):
    t = LPMTrie(4, {"0.0.0.0/0": 1})
    with pytest.raises(exc, match=word):
        t.lookup_batch(keys)


def test_ipv4_batch_accepts_lists_and_strided_views():
    t = LPMTrie(4, {"10.0.0.0/8": 1})
    assert t.lookup_batch([0x0A000001, 5])[1].tolist() == [True, False]
    strided = np.arange(0x0A000000, 0x0A000000 + 20, dtype=np.uint32)[::3]
    assert t.lookup_batch(strided)[0].tolist() == [1] * 7


@pytest.mark.parametrize("keys", [
    np.zeros((4, 15), np.uint8), np.zeros((4, 16), np.int8), np.zeros((4, 2), np.int64),
    np.zeros(16, np.uint8), np.zeros((4, 4), np.uint32), [[0] * 16],
])
def test_ipv6_batch_bad_arrays(keys):
    t = LPMTrie(6, {"::/0": 1})
    with pytest.raises(TypeError, match="IPv6"):
        t.lookup_batch(keys)


def test_numpy_scalars_are_ints():
    t = LPMTrie(4)
    t[(np.uint32(0x0A000000), np.uint8(8))] = np.uint16(3)
    assert t.lookup(np.uint32(0x0A010101)) == 3 and t.lookup(np.int64(0x0A000001)) == 3
    with pytest.raises(TypeError):
        t.lookup(np.float64(1.0))


def test_fuzzed_keys_only_raise_type_or_value_errors():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    junk = st.one_of(
        st.text(max_size=80), st.binary(max_size=20), st.integers(), st.floats(),
        st.text(alphabet="0123456789./:abcdef", max_size=45),
        st.tuples(st.text(alphabet="0123456789.:", max_size=20), st.integers(-5, 200)),
    )

    @settings(max_examples=400, deadline=None)
    @given(junk, st.sampled_from([4, 6]))
    def run(key, family):
        t = LPMTrie(family)
        for op in (lambda: t.__setitem__(key, 1), lambda: t.lookup(key), lambda: key in t,
                   lambda: t.get(key), lambda: t.lookup_prefix(key)):
            try:
                op()
            except (TypeError, ValueError, KeyError):
                pass

    run()
