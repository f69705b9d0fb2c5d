/* Internet checksum (RFC 1071) and its incremental update (RFC 1624).
 *
 * Rewriting a field never re-reads the packet: each rewrite returns a delta,
 * the one's-complement sum of ~old + new over the 16-bit words it changed,
 * and csum_apply() folds any number of deltas into a checksum field with
 * RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m').  Values are handled in network
 * word order (loaded big-endian), so the arithmetic is byte-order neutral. */
#ifndef CSUM_H
#define CSUM_H

#include <stddef.h>
#include <stdint.h>
#include "byteorder.h"

/* Fold a 32-bit one's-complement accumulator to 16 bits. */
static inline uint16_t csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

/* One's-complement sum of n bytes at p added to sum (odd tail padded with 0). */
static inline uint32_t csum_partial(const uint8_t *p, size_t n, uint32_t sum)
{
    uint64_t acc = sum;
    while (n >= 4) {
        acc += be_load32(p);
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        acc += be_load16(p);
        p += 2;
        n -= 2;
    }
    if (n)
        acc += (uint32_t)p[0] << 8;
    acc = (acc & 0xffffffffu) + (acc >> 32);
    acc = (acc & 0xffffffffu) + (acc >> 32);
    return (uint32_t)acc;
}

/* Sum of an IPv4 header without options (the common case, unrolled). */
static inline uint32_t csum_ipv4_hdr(const uint8_t *p, size_t ihl)
{
    if (ihl != 20)
        return csum_partial(p, ihl, 0);
    uint64_t acc = (uint64_t)be_load32(p) + be_load32(p + 4) + be_load32(p + 8)
                 + be_load32(p + 12) + be_load32(p + 16);
    acc = (acc & 0xffffffffu) + (acc >> 32);
    acc = (acc & 0xffffffffu) + (acc >> 32);
    return (uint32_t)acc;
}

/* The checksum field value for data whose sum is `sum`. */
static inline uint16_t csum_finish(uint32_t sum)
{
    return (uint16_t)~csum_fold(sum);
}

/* Delta for replacing the word `old` with `new`. */
static inline uint32_t csum_delta16(uint16_t old, uint16_t new_)
{
    return (uint32_t)(uint16_t)~old + new_;
}

static inline uint32_t csum_delta32(uint32_t old, uint32_t new_)
{
    return csum_delta16((uint16_t)(old >> 16), (uint16_t)(new_ >> 16))
         + csum_delta16((uint16_t)old, (uint16_t)new_);
}

/* Store a 16-bit word at p and return its checksum delta. */
static inline uint32_t csum_set16(uint8_t *p, uint16_t new_)
{
    uint16_t old = be_load16(p);
    be_store16(p, new_);
    return csum_delta16(old, new_);
}

static inline uint32_t csum_set32(uint8_t *p, uint32_t new_)
{
    uint32_t old = be_load32(p);
    be_store32(p, new_);
    return csum_delta32(old, new_);
}

/* Copy n bytes (n even) from src over p, return the delta. */
static inline uint32_t csum_set_bytes(uint8_t *p, const uint8_t *src, size_t n)
{
    uint32_t d = 0;
    for (size_t i = 0; i + 1 < n; i += 2)
        d += csum_set16(p + i, be_load16(src + i));
    return d;
}

/* RFC 1624 eqn. 3 on the checksum field at `field`; returns the field's own
 * delta so a checksum covering this field (an ICMP error's) can follow. */
static inline uint32_t csum_apply(uint8_t *field, uint32_t delta)
{
    uint16_t old = be_load16(field);
    uint16_t new_ = (uint16_t)~csum_fold((uint32_t)(uint16_t)~old + csum_fold(delta));
    be_store16(field, new_);
    return csum_delta16(old, new_);
}

/* UDP flavour: 0 means "no checksum" over IPv4 and stays 0; a computed 0 is
 * sent as 0xffff (RFC 768). */
static inline uint32_t csum_apply_udp(uint8_t *field, uint32_t delta)
{
    uint16_t old = be_load16(field);
    if (old == 0)
        return 0;
    uint16_t new_ = (uint16_t)~csum_fold((uint32_t)(uint16_t)~old + csum_fold(delta));
    if (new_ == 0)
        new_ = 0xffff;
    be_store16(field, new_);
    return csum_delta16(old, new_);
}

#endif /* CSUM_H */
