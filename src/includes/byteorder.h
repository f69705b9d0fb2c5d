/* Byte order, the core's one family: big-endian (network order) loads and
 * stores through memcpy, so any offset works (frames are rarely aligned once
 * headers are stacked, and addresses sit at any offset in packed keys).  The
 * compiler turns each into one (possibly unaligned) move plus a bswap, as
 * pgproto's hton.h does. */
#ifndef EGC_BYTEORDER_H
#define EGC_BYTEORDER_H

#include <stdint.h>
#include <string.h>

#ifndef EGRESSCORE_CHECKED
#define EGRESSCORE_CHECKED 0
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define EGC_BE16(x) (x)
#define EGC_BE32(x) (x)
#define EGC_BE64(x) (x)
#else
#define EGC_BE16(x) __builtin_bswap16(x)
#define EGC_BE32(x) __builtin_bswap32(x)
#define EGC_BE64(x) __builtin_bswap64(x)
#endif

static inline uint16_t be_load16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return EGC_BE16(v);
}

static inline uint32_t be_load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return EGC_BE32(v);
}

static inline uint64_t be_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return EGC_BE64(v);
}

static inline void be_store16(uint8_t *p, uint16_t v)
{
    v = EGC_BE16(v);
    memcpy(p, &v, 2);
}

static inline void be_store32(uint8_t *p, uint32_t v)
{
    v = EGC_BE32(v);
    memcpy(p, &v, 4);
}

static inline void be_store64(uint8_t *p, uint64_t v)
{
    v = EGC_BE64(v);
    memcpy(p, &v, 8);
}

#endif /* EGC_BYTEORDER_H */
