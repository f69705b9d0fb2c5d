# Address and MAC conversion at the Python boundary: the core's one set.
#
# Every concern takes addresses from Python the same way: a str, an ipaddress
# object, an int, packed bytes (4 or 16) or a NumPy integer, parsed by
# addr_parse into the family and two host-order 64-bit halves (IPv4: hi =
# the address, lo = 0).  The helpers below give each caller the form it
# works in and name the argument (`what`) in the ValueError for bad input.
# MACs are six bytes, or text with ':' or '-' between six hex pairs.
# Control-plane only: nothing here runs per packet.

import ipaddress as _ipaddress
from operator import index as _operator_index

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memchr, strlen

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL

cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "sys/socket.h":
    int AF_INET
    int AF_INET6

_IPv4Address = _ipaddress.IPv4Address
_IPv6Address = _ipaddress.IPv6Address
_MASK64 = (1 << 64) - 1


cdef int addr_parse_chars(const char* s, Py_ssize_t n, uint64_t* hi, uint64_t* lo) noexcept:
    """Parse a NUL-terminated address: 4 (hi = host-order IPv4), 6, or 0."""
    cdef uint8_t buf[16]
    if <Py_ssize_t>strlen(s) != n:
        return 0
    if memchr(s, 58, n) == NULL:
        if inet_pton(AF_INET, s, buf) != 1:
            return 0
        hi[0] = be_load32(buf)
        lo[0] = 0
        return 4
    if inet_pton(AF_INET6, s, buf) != 1:
        return 0
    hi[0] = be_load64(buf)
    lo[0] = be_load64(buf + 8)
    return 6


cdef inline void addr_split128(object x, uint64_t* hi, uint64_t* lo):
    hi[0] = <uint64_t>(x >> 64)
    lo[0] = <uint64_t>(x & _MASK64)


cdef int addr_parse(object x, int hint, uint64_t* hi, uint64_t* lo) except -1:
    """Family (4 or 6) of an address given as str, ipaddress object, int or
    packed bytes; IPv4 comes back as hi = host-order address, lo = 0.  An
    int is read in the `hint` family (0: IPv4 if it fits in 32 bits).
    ValueError for a malformed value, TypeError for a value of another type."""
    cdef Py_ssize_t n
    cdef const char* s
    cdef int fam
    if type(x) is str:
        s = PyUnicode_AsUTF8AndSize(x, &n)
        fam = addr_parse_chars(s, n, hi, lo) if n < 64 else 0
        if fam == 0:
            raise ValueError(f"{x!r} is not a valid IP address")
        return fam
    if isinstance(x, _IPv4Address):
        hi[0] = <uint32_t>int(x)
        lo[0] = 0
        return 4
    if isinstance(x, _IPv6Address):
        addr_split128(int(x), hi, lo)
        return 6
    if isinstance(x, int) and not isinstance(x, bool):
        if x < 0 or x >= (1 << 128) or (hint == 4 and x >= (1 << 32)):
            raise ValueError(f"{x!r} is out of range for an IPv{hint or 6} address")
        if hint == 4 or (hint == 0 and x < (1 << 32)):
            hi[0] = <uint32_t>x
            lo[0] = 0
            return 4
        addr_split128(x, hi, lo)
        return 6
    if isinstance(x, (bytes, bytearray)) and len(x) in (4, 16):
        if len(x) == 4:
            hi[0] = int.from_bytes(x, "big")
            lo[0] = 0
            return 4
        addr_split128(int.from_bytes(x, "big"), hi, lo)
        return 6
    if isinstance(x, str):
        return addr_parse(str(x), hint, hi, lo)
    if hasattr(x, "__index__") and not isinstance(x, bool):   # NumPy integers
        return addr_parse(_operator_index(x), hint, hi, lo)
    raise TypeError(f"expected an IP address (str, ipaddress object, int or packed bytes), "
                    f"got {type(x).__name__}: {x!r}")


cdef int addr_parse_named(object value, str what, int want, uint64_t* hi, uint64_t* lo) except -1:
    """addr_parse, with a ValueError naming `what` for anything that is not
    an address (of family `want`, when 4 or 6)."""
    cdef int fam
    try:
        fam = addr_parse(value, want, hi, lo)
    except (ValueError, TypeError):
        fam = 0
    if fam == 0 or (want and fam != want):
        kind = f"an IPv{want}" if want else "an IPv4 or IPv6"
        raise ValueError(f"{what} must be {kind} address, not {value!r}")
    return fam


cdef object addr_object_of(int fam, uint64_t hi, uint64_t lo):
    """The ipaddress object of a parsed address."""
    if fam == 4:
        return _IPv4Address(<uint32_t>hi)
    return _IPv6Address((<object>hi << 64) | lo)


cdef object addr_object(object value, str what):
    """The ipaddress object of `value` (IPv4 or IPv6)."""
    cdef uint64_t hi, lo
    return addr_object_of(addr_parse_named(value, what, 0, &hi, &lo), hi, lo)


cdef tuple addr_packed16(object value, str what):
    """(family, 16 bytes in network order, IPv4 in the first 4) of `value`."""
    cdef uint8_t buf[16]
    cdef uint64_t hi, lo
    cdef int fam = addr_parse_named(value, what, 0, &hi, &lo)
    if fam == 4:
        be_store32(buf, <uint32_t>hi)
        be_store32(buf + 4, 0)
        be_store64(buf + 8, 0)
    else:
        be_store64(buf, hi)
        be_store64(buf + 8, lo)
    return fam, (<char*>buf)[:16]


cdef uint32_t addr_v4(object value, str what) except? 0:
    """Host-order IPv4 address of `value` (an IPv6 one is a ValueError)."""
    cdef uint64_t hi, lo
    addr_parse_named(value, what, 4, &hi, &lo)
    return <uint32_t>hi


cdef bytes mac_bytes(object value, str what):
    """Six bytes of a MAC given as 6 bytes or as 'aa:bb:cc:dd:ee:ff' /
    'aa-bb-cc-dd-ee-ff' (one or two hex digits per part)."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 6:
        return bytes(value)
    if isinstance(value, str):
        parts = value.replace("-", ":").split(":")
        if len(parts) == 6 and all(1 <= len(x) <= 2 for x in parts):
            try:
                return bytes(int(x, 16) for x in parts)
            except ValueError:
                pass
    raise ValueError(f"{what} must be a MAC address like 02:00:00:00:00:01 or 02-00-00-00-00-01, "
                     f"not {value!r}")
