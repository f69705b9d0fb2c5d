# Internet checksum (RFC 1071) and its incremental update (RFC 1624): csum.h.
from libc.stdint cimport uint8_t, uint16_t, uint32_t

cdef extern from "csum.h" nogil:
    uint16_t csum_fold(uint32_t sum)
    uint32_t csum_partial(const uint8_t *p, size_t n, uint32_t sum)
    uint16_t csum_finish(uint32_t sum)
    uint32_t csum_ipv4_hdr(const uint8_t *p, size_t ihl)
    uint32_t csum_delta16(uint16_t old, uint16_t new_)
    uint32_t csum_delta32(uint32_t old, uint32_t new_)
    uint32_t csum_set16(uint8_t *p, uint16_t new_)
    uint32_t csum_set32(uint8_t *p, uint32_t new_)
    uint32_t csum_set_bytes(uint8_t *p, const uint8_t *src, size_t n)
    uint32_t csum_apply(uint8_t *field, uint32_t delta)
    uint32_t csum_apply_udp(uint8_t *field, uint32_t delta)
