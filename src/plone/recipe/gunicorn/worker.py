"""gunicorn's workers, which clients that send nothing, or little, cannot hold.

A client may connect and then send nothing: a browser's speculative
preconnect, a TCP health check, a port scan.  Or it may send its request
a few bytes at a time, slowly, on a bad link or on purpose ("slowloris").

- gunicorn's sync worker serves one connection at a time and reads the
  request from a blocking socket: such a client holds the worker until the
  master kills it for missing the worker ``timeout`` (300 s by the recipe's
  default), and as many such clients as there are workers stop the site.
- gunicorn's gthread worker gives such a client one of its threads for 5 s
  before it parks the connection: as many such clients as threads stop the
  site for those 5 s.
- Both read a request that trickles in from a blocking socket, for as long
  as it trickles.

The recipe's workers are gunicorn's with these changes:

- both ask the kernel not to hand over a TCP connection before its first
  bytes arrive (``TCP_DEFER_ACCEPT``, Linux; what Apache does by default), so
  a silent client costs no worker while the kernel holds it (a few seconds,
  then it hands the connection over anyway);
- the sync worker gives a connection it does get gunicorn's ``keepalive``
  seconds (2 by default; at least one) to send its first bytes, and closes
  it otherwise, as gunicorn's gthread worker does with a connection that
  sends no request;
- over TCP both give a request's header section, once its first bytes
  are there, ``HEADER_TIMEOUT`` seconds (10) to arrive, and close the
  connection otherwise, as Apache's ``mod_reqtimeout`` does for its
  processes (20 s there).  gunicorn's sync worker would read on until the
  worker timeout, a gthread thread for as long as the client sends.  A
  request that has arrived costs one look at its bytes, and the sync
  worker one ``poll`` before and one to close (below).

After the response the sync worker closes the connection, and so does the
gthread worker when the client asked for it (``Connection: close``, HTTP
1.0).  gunicorn's close it gracefully: they half-close and wait, up to
2 s, for the client to close its side, so that a request the client may
still be sending cannot make the kernel reset the connection and destroy
the response.  Meanwhile the sync worker serves no one, and the gthread
worker's main thread, which serves every connection, waits: one round
trip to the client per request, up to 2 s for a client that keeps the
connection open.  The recipe's workers wait only when the client may still
be sending, as nginx does (``lingering_close on``): when the request had a
body not read to its end, or bytes beyond the request have arrived.
Otherwise they close at once; the kernel still delivers the response,
then the FIN.  A client that has closed its end already (wrk, curl: they
close once they have read a response that says ``Connection: close``)
cannot still be sending either.

gunicorn sends a response's head and its body with two writes, and a
client on the same host wakes up for each.  The recipe's workers hold
the head back until the first bytes of the body and send both with one
write, as bjoern does: one wake-up and one system call fewer per
response.  A response without a body (``HEAD``, 304) sends
its head when it ends; a body larger than ``HEAD_WITH_BODY`` bytes is sent
after its head, rather than copied to join it.
"""

import math
import select
import socket
import time

from gunicorn.http.body import LengthReader
from gunicorn.workers import gthread, sync

TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", None)  # Linux only
TCP = (socket.AF_INET, socket.AF_INET6)
HEADER_TIMEOUT = 10  # seconds for a request's header section, from its first byte
HEADER_PEEK = 65536  # bytes of it looked at; a longer one is left to gunicorn's parser
HEAD_WITH_BODY = 65536  # body bytes a response's head is joined to in one write


class ClientLimits:
    """Mixin for a gunicorn worker: no connection before its first bytes,
    how long a client may take to send its request, and when the
    connection may close at once after the response."""

    def init_process(self):
        # Seconds a new connection has to send its request: keepalive, at
        # least one, and within the master's heartbeat (self.timeout is half
        # the worker timeout; 0 when there is none), so that a waiting sync
        # worker is not killed.
        heartbeat = self.timeout or math.inf
        self.request_wait = min(max(self.cfg.keepalive, 1), heartbeat)
        self.header_wait = min(HEADER_TIMEOUT, heartbeat)  # for the rest of its headers
        # The listening sockets are the master's, shared by all workers:
        # setting the option again is harmless.
        for listener in self.sockets:
            if TCP_DEFER_ACCEPT and listener.family in TCP:
                listener.setsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT,
                                    math.ceil(self.request_wait))
        super().init_process()  # runs the worker until it exits

    def headers_too_slow(self, sock, addr, already=b""):
        """Whether a TCP client's request headers took over ``header_wait``;
        ``already``: the request's first bytes, read from the socket before."""
        if (sock.family not in TCP or self.cfg.is_ssl
                or header_arrived(sock, self.header_wait, already)):
            return False
        self.log.debug("Closing a connection from %s whose request headers took "
                       "longer than %ss", addr, self.header_wait)
        return True

    def may_close_at_once(self, req, sock):
        """Whether the client has sent all of ``req`` and nothing more (not
        told over TLS, whose bytes cannot be looked at in the socket)."""
        return not self.cfg.is_ssl and nothing_more_to_come(req, sock)


class SyncWorker(ClientLimits, sync.SyncWorker):
    """``worker-class = plone.recipe.gunicorn.worker.SyncWorker``."""

    def handle(self, listener, client, addr):
        if not sent_something(client, self.request_wait):
            self.log.debug("Closed a connection from %s that sent no request in %ss",
                           addr, self.request_wait)
            client.close()
        elif self.headers_too_slow(client, addr):
            client.close()
        else:
            super().handle(listener, client, addr)

    def handle_request(self, listener, req, client, addr):
        # gunicorn's response writes to the socket it is given.
        held = HeadHeldBack(client)
        try:
            super().handle_request(listener, req, held, addr)
        finally:
            held.flush()  # the head of a response without body
        # gunicorn's handle() then closes gracefully; on a closed socket
        # that is a no-op.
        if self.may_close_at_once(req, client):
            client.close()


class ThreadWorker(ClientLimits, gthread.ThreadWorker):
    """``worker-class = plone.recipe.gunicorn.worker.ThreadWorker``."""

    def handle_request(self, req, conn):
        # gunicorn's response writes to the connection's socket, which is
        # this thread's until the request is done.
        sock = conn.sock
        conn.sock = held = HeadHeldBack(sock)
        try:
            return super().handle_request(req, conn)
        finally:
            conn.sock = sock
            held.flush()  # the head of a response without body

    def handle(self, conn):
        # Runs in a pool thread, for a new connection and for every request
        # on a kept-alive one.  A new one may not have sent anything yet:
        # the kernel hands it over after a few silent seconds anyway
        # (TCP_DEFER_ACCEPT).  Wait for its first bytes as gunicorn would
        # (then it parks the connection, after 5 s), so that the header
        # deadline counts from them.
        if (not conn.initialized and not conn.data_ready
                and not conn.wait_for_data(gthread.DEFAULT_WORKER_DATA_TIMEOUT)):
            return gthread._DEFER  # gunicorn's "park it": no data in time
        # On a kept-alive connection gunicorn may have read the start of the
        # next request (pipelined) along with the last one.
        already = conn.parser.unreader.buf.getvalue() if conn.parser is not None else b""
        if not conn.is_http2 and self.headers_too_slow(conn.sock, conn.client, already):
            # gunicorn closes it on the worker's main thread, gracefully: shut
            # down first, or that waits up to 2 s for a client still sending.
            shut_down(conn.sock)
            return False
        keepalive = super().handle(conn)
        # Not kept alive: gunicorn closes it gracefully on the main thread,
        # which waits meanwhile, up to 2 s, for the client to close first.
        # As the sync worker does, spare that when nothing more is to come.
        if keepalive is False and not conn.is_http2:
            req = getattr(conn.parser, "mesg", None)  # the last request parsed
            if req is not None and self.may_close_at_once(req, conn.sock):
                shut_down(conn.sock)  # then gunicorn's close finds nothing to wait for
        return keepalive


class HeadHeldBack:
    """A client socket for gunicorn's response to write to: its first write,
    the response's head, is held back and sent with the next non-empty one,
    the body's first bytes.  Anything else done with the socket sends the
    head first."""

    def __init__(self, sock):
        self.sock = sock
        self.head = None
        self.written = False

    def sendall(self, data):
        if not self.written:  # gunicorn writes a response's head first
            self.written = True
            self.head = bytes(data)
        elif data:  # gunicorn's write of an empty chunk would send nothing
            if self.head is not None and len(data) <= HEAD_WITH_BODY:
                data, self.head = self.head + data, None
            self.flush()
            self.sock.sendall(data)

    def flush(self):
        """Send the head, if held."""
        if self.head is not None:
            head, self.head = self.head, None
            self.sock.sendall(head)

    def __getattr__(self, name):  # sendfile, shutdown, close, fileno ...
        self.flush()
        return getattr(self.sock, name)


def shut_down(sock):
    """Send the FIN now and end reading, so that a graceful close does not wait."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def nothing_more_to_come(req, client):
    """Whether the client has sent all it meant to: closing cannot reset."""
    body = req.body.reader
    return (isinstance(body, LengthReader) and body.length == 0  # body read to its end
            and not req.unreader.buf.getvalue()  # nothing read beyond it
            and nothing_waiting(client))  # nor in the kernel


def nothing_waiting(client):
    """Whether no bytes from the client wait in the kernel: none came, or
    it has closed its end (then none can come).  One look, as in
    ``header_arrived``: gunicorn's workers keep the socket blocking, without
    a timeout, so ``recv`` does not wait first."""
    try:
        return client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""  # b"": closed
    except OSError:  # none came (EAGAIN), or reset: the client is gone
        return True


def header_arrived(client, seconds, already=b""):
    """Whether the request's header section arrives within ``seconds``.

    ``already`` is what was read of the request before.  Looks at what has
    arrived without taking it (``MSG_PEEK``), and waits
    for more with ``SO_RCVLOWAT`` (TCP only: ``poll`` ignores it on a unix
    socket).  True as well when the client closed or the section is too
    long to wait for: then gunicorn's parser answers as it would.
    """
    deadline = time.monotonic() + seconds
    poller = None  # made only to wait: most requests arrive whole
    seen = -1
    try:
        while True:
            try:
                data = client.recv(HEADER_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:  # reset, or nothing yet: gunicorn's worker will tell
                return True
            request = already + data
            if (len(data) == seen  # readable, nothing new: the client closed its end
                    or not data or len(request) >= HEADER_PEEK
                    or b"\r\n\r\n" in request or b"\n\n" in request):
                return True
            seen = len(data)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, seen + 1)
            if poller is None:
                poller = select.poll()
                poller.register(client, select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return False
    finally:
        if seen > 0:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def sent_something(client, seconds):
    """Whether the client sent bytes (or closed) within ``seconds``."""
    poller = select.poll()
    poller.register(client, select.POLLIN)
    return bool(poller.poll(seconds * 1000))
