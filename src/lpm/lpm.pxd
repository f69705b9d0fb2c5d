# lpm declarations: the poptrie-style LPM core (lpm_core.h), the egress
# policy map (lpm_egress.h), and the cdef classes that own them.  The fused
# datapath calls the inline nogil functions at the bottom.
from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "lpm/lpm_core.h" nogil:
    const uint32_t LPM_NODE
    const uint32_t LPM_NONE
    const uint32_t LPM_VALUE_MAX

    ctypedef struct lpm_table:
        uint32_t dbits
        uint32_t n_nodes
        uint32_t n_leaves
        void* aux
        size_t aux_bytes

    ctypedef struct lpm_entry:
        uint64_t hi
        uint64_t lo
        uint32_t val
        uint32_t len

    ctypedef struct lpm_seq_entry:
        lpm_entry ent
        size_t seq

    ctypedef struct lpm_trie:
        lpm_table* cur
        lpm_entry* e
        size_t n
        size_t cap
        unsigned width

    # read sections (one domain for every table; see lpm_core.h)
    void lpm_rcu_read_lock()
    void lpm_rcu_read_unlock()
    int lpm_rcu_reading()
    void lpm_rcu_assert_reading()
    void lpm_rcu_sync()
    uint64_t lpm_rcu_readers()
    void lpm_rcu_slots(uint64_t* owned, uint64_t* total)
    const void* lpm_rcu_my_slot()
    uint32_t lpm4_table_lookup(const lpm_table* t, uint32_t addr)
    uint32_t lpm6_table_lookup(const lpm_table* t, uint64_t hi, uint64_t lo)
    void lpm4_table_lookup_batch(const lpm_table* t, const uint32_t* keys, size_t n,
                                 uint32_t* out, uint8_t* found)
    void lpm6_table_lookup_batch(const lpm_table* t, const void* keys, int as_bytes, size_t n,
                                 uint32_t* out, uint8_t* found)
    lpm_table* lpm_table_build(const lpm_entry* e, size_t n, unsigned width)
    void lpm_table_free(lpm_table* t)
    size_t lpm_table_bytes(const lpm_table* t)
    lpm_entry* lpm_entries_merge(const lpm_entry* old, size_t n, lpm_seq_entry* add, size_t m,
                                 size_t* out_n)
    const lpm_table* lpm_trie_table(lpm_trie* t)
    int lpm_trie_publish(lpm_trie* t)
    int lpm_trie_store(lpm_trie* t, const lpm_entry* key)
    int lpm_trie_delete(lpm_trie* t, const lpm_entry* key)
    long lpm_trie_find(const lpm_trie* t, const lpm_entry* key)


cdef extern from "lpm/lpm_egress.h" nogil:
    const int EGRESS_NO_MATCH
    const int EGRESS_MATCH
    const int EGRESS_EXCLUDED
    const int EGRESS_NO_GATEWAY
    const int EGRESS_GW_NOT_FOUND
    const int EGRESS_GW_EXCLUDED

    ctypedef struct egress_row4:
        uint32_t dst
        uint32_t plen
        uint32_t egress
        uint32_t gateway
        uint32_t policy

    ctypedef struct egress_row6:
        uint64_t d_hi
        uint64_t d_lo
        uint64_t e_hi
        uint64_t e_lo
        uint64_t g_hi
        uint64_t g_lo
        uint32_t plen
        uint32_t policy

    ctypedef struct egress_src:
        uint32_t n
        uint32_t v6
        lpm_table* tbl

    ctypedef struct egress_slot:
        uint64_t hi
        uint64_t lo
        egress_src* src

    ctypedef struct egress_snap:
        uint32_t bits
        uint32_t n
        egress_slot* slots

    ctypedef struct egress_map:
        egress_snap* snap[2]

    ctypedef struct egress_wrow:
        uint64_t s_hi
        uint64_t s_lo
        uint64_t d_hi
        uint64_t d_lo
        uint64_t e_hi
        uint64_t e_lo
        uint64_t g_hi
        uint64_t g_lo
        uint32_t plen
        uint32_t policy
        uint32_t v6
        uint32_t op
        uint64_t seq

    egress_src* EGRESS_TOMB
    egress_row4* EGRESS_ROWS4(const egress_src* s)
    egress_row6* EGRESS_ROWS6(const egress_src* s)

    const egress_snap* egress_map_snap(egress_map* m, int v6)
    const egress_src* egress_snap_find(const egress_snap* s, uint64_t hi, uint64_t lo)
    long egress_src_match4(const egress_src* s, uint32_t dst)
    long egress_src_match6(const egress_src* s, uint64_t hi, uint64_t lo)
    long egress_src_find_row(const egress_src* s, uint64_t d_hi, uint64_t d_lo, uint32_t plen)
    size_t egress_src_bytes(const egress_src* s)
    int egress_snap_lookup4p(const egress_snap* s, uint32_t src, uint32_t dst,
                             uint32_t* egress, uint32_t* gateway, uint32_t* policy)
    int egress_snap_lookup4(const egress_snap* s, uint32_t src, uint32_t dst,
                            uint32_t* egress, uint32_t* gateway)
    int egress_map_lookup4(egress_map* m, uint32_t src, uint32_t dst,
                           uint32_t* egress, uint32_t* gateway)
    int egress_map_lookup4p(egress_map* m, uint32_t src, uint32_t dst,
                            uint32_t* egress, uint32_t* gateway, uint32_t* policy)
    int egress_map_lookup4p_in(egress_map* m, uint32_t src, uint32_t dst,
                               uint32_t* egress, uint32_t* gateway, uint32_t* policy)
    int egress_map_lookup6(egress_map* m, const uint8_t* src16, const uint8_t* dst16,
                           uint8_t* egress16, uint8_t* gateway16)
    void egress_map_lookup4_batch(egress_map* m, const uint32_t* src, const uint32_t* dst, size_t n,
                                  uint32_t* egress, uint32_t* gateway, uint8_t* status, uint32_t* policy)
    void egress_map_lookup6_batch(egress_map* m, const uint8_t* src, const uint8_t* dst, size_t n,
                                  uint8_t* egress, uint8_t* gateway, uint8_t* status, uint32_t* policy)
    void egress_wrows_sort(egress_wrow* w, size_t n)
    int egress_map_sync_rows(egress_map* m, const egress_wrow* w, size_t n, size_t* counts)
    long egress_map_update_rows(egress_map* m, const egress_wrow* w, size_t n, long* delta)
    void egress_map_clear(egress_map* m)
    void egress_map_free_all(egress_map* m)


cdef class LPMTrie:
    cdef lpm_trie* c
    cdef readonly int family
    cdef int _entry(self, object prefix, lpm_entry* out) except -1
    cdef object _network(self, const lpm_entry* e)


cdef class EgressMap:
    cdef egress_map* c
    cdef Py_ssize_t _count
    cdef int _row(self, object item, egress_wrow* w, int op) except -1
    cdef long _write(self, egress_wrow* w, size_t n) except? -9
    cdef object _entry(self, int v6, uint64_t s_hi, uint64_t s_lo, const egress_src* es, long i)


# ---- C API for the fused datapath (all nogil, never raise) -----------------

cdef inline int lpm4_lookup(LPMTrie t, uint32_t addr, uint32_t* value) noexcept nogil:
    """Longest-prefix match of a host-order IPv4 address: 1 and *value, or 0."""
    lpm_rcu_read_lock()
    cdef uint32_t v = lpm4_table_lookup(lpm_trie_table(t.c), addr)
    lpm_rcu_read_unlock()
    value[0] = v
    return v != LPM_NONE


cdef inline int lpm6_lookup(LPMTrie t, const uint8_t* addr16, uint32_t* value) noexcept nogil:
    """Longest-prefix match of a 16-byte network-order IPv6 address."""
    lpm_rcu_read_lock()
    cdef uint32_t v = lpm6_table_lookup(lpm_trie_table(t.c), be_load64(addr16),
                                        be_load64(addr16 + 8))
    lpm_rcu_read_unlock()
    value[0] = v
    return v != LPM_NONE


cdef inline int egress_lookup4(EgressMap m, uint32_t src, uint32_t dst,
                               uint32_t* egress_ip, uint32_t* gateway_ip) noexcept nogil:
    """Egress policy for host-order IPv4 (src, dst): an EGRESS_* status."""
    return egress_map_lookup4(m.c, src, dst, egress_ip, gateway_ip)


cdef inline int egress_lookup6(EgressMap m, const uint8_t* src16, const uint8_t* dst16,
                               uint8_t* egress16, uint8_t* gateway16) noexcept nogil:
    """Egress policy for 16-byte network-order IPv6 (src, dst): an EGRESS_* status."""
    return egress_map_lookup6(m.c, src16, dst16, egress16, gateway16)


# Read sections around many lookups: a datapath loop enters one per batch and
# then looks up (the *_in calls, any table) without any atomic operation per
# packet.  A section is the calling thread's (its own cache line, lpm_core.h)
# and covers every table: the table arguments below are not needed.  Between
# begin and end no table a lookup sees can be freed; keep sections short (one
# batch).  Never acquire the GIL inside a section: writers hold the GIL while
# they wait for sections to end, so that would deadlock.

cdef inline unsigned lpm_read_begin(LPMTrie t) noexcept nogil:
    lpm_rcu_read_lock()
    return 0


cdef inline void lpm_read_end(LPMTrie t, unsigned section) noexcept nogil:
    lpm_rcu_read_unlock()


cdef inline uint32_t lpm4_lookup_in(LPMTrie t, uint32_t addr) noexcept nogil:
    """Inside a read section: the value, or LPM_NONE."""
    return lpm4_table_lookup(lpm_trie_table(t.c), addr)


cdef inline unsigned egress_read_begin(EgressMap m) noexcept nogil:
    lpm_rcu_read_lock()
    return 0


cdef inline void egress_read_end(EgressMap m, unsigned section) noexcept nogil:
    lpm_rcu_read_unlock()


cdef inline int egress_lookup4_in(EgressMap m, uint32_t src, uint32_t dst,
                                  uint32_t* egress_ip, uint32_t* gateway_ip) noexcept nogil:
    """Inside a read section: egress_lookup4 without per-call atomics."""
    return egress_snap_lookup4(egress_map_snap(m.c, 0), src, dst, egress_ip, gateway_ip)
