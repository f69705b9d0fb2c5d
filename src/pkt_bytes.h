/* Byte order for packet fields: big-endian loads and stores through memcpy,
 * so any offset works (frames are rarely aligned once headers are stacked).
 * The compiler turns each into one (possibly unaligned) move plus a bswap. */
#ifndef PKT_BYTES_H
#define PKT_BYTES_H

#include <stdint.h>
#include <string.h>

#ifndef EGRESSCORE_CHECKED
#define EGRESSCORE_CHECKED 0
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define PKT_BE16(x) (x)
#define PKT_BE32(x) (x)
#else
#define PKT_BE16(x) __builtin_bswap16(x)
#define PKT_BE32(x) __builtin_bswap32(x)
#endif

static inline uint16_t pkt_load16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return PKT_BE16(v);
}

static inline uint32_t pkt_load32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return PKT_BE32(v);
}

static inline void pkt_store16(uint8_t *p, uint16_t v)
{
    v = PKT_BE16(v);
    memcpy(p, &v, 2);
}

static inline void pkt_store32(uint8_t *p, uint32_t v)
{
    v = PKT_BE32(v);
    memcpy(p, &v, 4);
}

#endif /* PKT_BYTES_H */
