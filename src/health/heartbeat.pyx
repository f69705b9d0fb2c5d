# Heartbeat answers in C (egresscore.health.Responder): each ping that comes
# in on a UDP socket goes back as a pong, on a thread that runs here with the
# GIL released for as long as it serves.  Why C: a Python responder waits for
# the GIL after every recvfrom(), and a thread of the agent that holds it (a
# cyclic GC pass, a control job) while the machine is loaded delays the pong
# past the prober's tolerance: a gateway that is up marked down.
#
# A heartbeat is 16 bytes: b"EGCH", a kind byte (1 ping, 2 pong), 3 zero
# bytes, a 64-bit round number (egresscore.health); the pong is the ping
# with its kind byte changed.
from libc.stdint cimport uint8_t, uint64_t

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int _hb_socklen_t "socklen_t"
    struct _hb_sockaddr_storage "sockaddr_storage":
        pass
    struct _hb_sockaddr "sockaddr":
        pass
    ssize_t _hb_recvfrom "recvfrom"(int fd, void *buf, size_t n, int flags, _hb_sockaddr *addr,
                                    _hb_socklen_t *alen)
    ssize_t _hb_sendto "sendto"(int fd, const void *buf, size_t n, int flags, const _hb_sockaddr *addr,
                                _hb_socklen_t alen)
    int _HB_MSG_DONTWAIT "MSG_DONTWAIT"

cdef extern from "<poll.h>" nogil:
    struct _hb_pollfd "pollfd":
        int fd
        short events
        short revents
    int _hb_poll "poll"(_hb_pollfd *fds, unsigned long nfds, int timeout)
    short _HB_POLLIN "POLLIN"

cdef extern from "<errno.h>" nogil:
    int _hb_errno "errno"
    int _HB_EAGAIN "EAGAIN"
    int _HB_EINTR "EINTR"
    int _HB_ECONNREFUSED "ECONNREFUSED"
    int _HB_EHOSTUNREACH "EHOSTUNREACH"
    int _HB_ENETUNREACH "ENETUNREACH"
    int _HB_EHOSTDOWN "EHOSTDOWN"

cdef enum:
    HB_SIZE = 16
    HB_PING = 1
    HB_PONG = 2


cdef class HeartbeatAnswerer:
    """Answers heartbeat pings on a bound UDP socket from C: serve() blocks
    (GIL released) until stop_fd becomes readable; `answered` counts pongs
    sent, `ignored` datagrams that are not pings."""
    cdef readonly uint64_t answered, ignored

    def serve(self, int fd, int stop_fd):
        """Answer until stop_fd is readable (returns 0) or the socket fails
        (returns its errno)."""
        cdef int rc
        with nogil:
            rc = self._serve(fd, stop_fd)
        return rc

    cdef int _serve(self, int fd, int stop_fd) noexcept nogil:
        cdef _hb_pollfd fds[2]
        cdef uint8_t buf[64]
        cdef _hb_sockaddr_storage peer
        cdef _hb_socklen_t plen
        cdef ssize_t n
        cdef int e
        fds[0].fd = fd
        fds[0].events = _HB_POLLIN
        fds[1].fd = stop_fd
        fds[1].events = _HB_POLLIN
        while True:
            fds[0].revents = 0
            fds[1].revents = 0
            if _hb_poll(fds, 2, -1) < 0:
                if _hb_errno == _HB_EINTR:
                    continue
                return _hb_errno
            if fds[1].revents:
                return 0
            while True:
                plen = sizeof(peer)
                n = _hb_recvfrom(fd, buf, sizeof(buf), _HB_MSG_DONTWAIT, <_hb_sockaddr *>&peer, &plen)
                if n < 0:
                    e = _hb_errno
                    if e == _HB_EAGAIN or e == _HB_EINTR:
                        break
                    if e == _HB_ECONNREFUSED or e == _HB_EHOSTUNREACH or e == _HB_ENETUNREACH or e == _HB_EHOSTDOWN:
                        continue        # an ICMP error for an earlier pong: read on
                    return e
                if (n != HB_SIZE or buf[0] != 69 or buf[1] != 71 or buf[2] != 67 or buf[3] != 72
                        or buf[4] != HB_PING):
                    self.ignored += 1
                    continue
                buf[4] = HB_PONG
                if _hb_sendto(fd, buf, HB_SIZE, _HB_MSG_DONTWAIT, <_hb_sockaddr *>&peer, plen) == HB_SIZE:
                    self.answered += 1
