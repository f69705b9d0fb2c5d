# The one allocator for big tables (alloc.h): zeroed, lazily backed, huge
# pages advised; free with the size it was allocated with.
cdef extern from "alloc.h" nogil:
    void *egc_alloc_big(size_t size, int huge)
    void egc_free_big(void *p, size_t size)
