/* egresscore flow log: a bounded multi-producer, single-consumer ring of
 * fixed-size records (Vyukov's bounded queue: one sequence number per slot).
 *
 * Producers never wait for the consumer: when the ring is full the claim
 * fails and the caller counts the lost record.  A claim only retries when
 * another producer won the same slot (lock-free, no spinning on the reader).
 *
 *   slot i is free for position p      when seq[i] == p
 *   slot i holds the record of p       when seq[i] == p + 1
 *   the consumer frees it for p + size by seq[i] = p + size
 */
#ifndef EGRESSCORE_FLOW_RING_H
#define EGRESSCORE_FLOW_RING_H
#include <stdint.h>

/* Claim the next position; returns it, or -1 when the ring is full. */
static inline int64_t flow_ring_claim(uint64_t *enq, uint64_t *seq, uint64_t mask)
{
    uint64_t pos = __atomic_load_n(enq, __ATOMIC_RELAXED);
    for (;;) {
        uint64_t s = __atomic_load_n(&seq[pos & mask], __ATOMIC_ACQUIRE);
        int64_t dif = (int64_t)(s - pos);
        if (dif == 0) {
            if (__atomic_compare_exchange_n(enq, &pos, pos + 1, 1,
                                            __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return (int64_t)pos;
        } else if (dif < 0) {
            return -1;
        } else {
            pos = __atomic_load_n(enq, __ATOMIC_RELAXED);
        }
    }
}

/* Make the record written at `pos` visible to the consumer. */
static inline void flow_ring_publish(uint64_t *seq, uint64_t mask, uint64_t pos)
{
    __atomic_store_n(&seq[pos & mask], pos + 1, __ATOMIC_RELEASE);
}

/* 1 if the record of `pos` is published. */
static inline int flow_ring_ready(uint64_t *seq, uint64_t mask, uint64_t pos)
{
    return __atomic_load_n(&seq[pos & mask], __ATOMIC_ACQUIRE) == pos + 1;
}

/* Hand the slot of `pos` back to producers (after the record was copied). */
static inline void flow_ring_release(uint64_t *seq, uint64_t mask, uint64_t pos)
{
    __atomic_store_n(&seq[pos & mask], pos + mask + 1, __ATOMIC_RELEASE);
}

static inline void flow_atomic_add(uint64_t *p, uint64_t v)
{
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t flow_atomic_load(uint64_t *p)
{
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}
#endif
