# Byte order: big-endian loads and stores at any offset (byteorder.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "byteorder.h" nogil:
    uint16_t be_load16(const uint8_t *p)
    uint32_t be_load32(const uint8_t *p)
    uint64_t be_load64(const uint8_t *p)
    void be_store16(uint8_t *p, uint16_t v)
    void be_store32(uint8_t *p, uint32_t v)
    void be_store64(uint8_t *p, uint64_t v)
    const int EGRESSCORE_CHECKED
