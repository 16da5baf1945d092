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
  request that has arrived costs one look at its bytes (two on a new
  connection to the sync worker), and one more to close (below).

gunicorn's sync worker closes every connection after its response: each
request costs the client and the server a new TCP connection, where
waitress and bjoern keep it open for the next one (a fifth of the
throughput on Zope's front page, measured).  The recipe's sync worker
keeps connections alive, as the gthread worker does, but without threads:
it waits for all of its kept connections and its listeners with one
``epoll`` and serves one request at a time.  A kept connection belongs to
one worker, so a slow request would hold the worker's other connections
with it; once a request has taken ``PASS_ON_AFTER_CPU`` of CPU (10 ms) or
``PASS_ON_AFTER`` in all (50 ms, for one that waits: on the ZEO server,
a client, a core), a timer (``SIGALRM``, looking every 10 ms) passes them
to the other workers over a datagram socket pair the master made
(``SCM_RIGHTS``), and whichever is free first serves them.  A request
that waits 10 ms for a core under full load has not computed for 10 ms:
counted in CPU, only slow pages pass connections on early.
Kept connections also wait while their worker waits for a core: so only
as many sync workers as there are cores keep connections, and the others
(one, by the recipe's default of cores + 1) stand by, closing each
connection after its response.  Under steady load the keepers end up
with all of them and the one standing by idles, leaving the cores to the
others; it serves new connections and passed ones when the keepers are
busy or held by slow requests.

When a connection is not kept (the client asked for ``Connection: close``,
HTTP 1.0, ``keepalive = 0``, TLS on the sync worker), gunicorn's workers
close it gracefully: they half-close and wait, up to
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

gunicorn's gthread workers keep each connection with the worker that
accepted it, and a worker accepts whenever its main thread is free, so one
of several may take most of a burst of new connections and keep them.
The recipe's gthread workers share them out (``ThreadWorker``).
"""

import errno
import fcntl
import math
import mmap
import os
import select
import selectors
import signal
import socket
import struct
import tempfile
import time
from datetime import datetime

from gunicorn import http, util
from gunicorn.http import wsgi
from gunicorn.http.body import LengthReader
from gunicorn.workers import gthread, sync

TCP_DEFER_ACCEPT = getattr(socket, "TCP_DEFER_ACCEPT", None)  # Linux only
TCP = (socket.AF_INET, socket.AF_INET6)
HEADER_TIMEOUT = 10  # seconds for a request's header section, from its first byte
HEADER_PEEK = 65536  # bytes of it looked at; a longer one is left to gunicorn's parser
HEAD_WITH_BODY = 65536  # body bytes a response's head is joined to in one write
PASS_ON_AFTER_CPU = 0.01  # seconds of CPU a request takes before the sync worker passes
PASS_ON_AFTER = 0.05  # on its other connections, or seconds it takes in all
KEEPER_RETRY = 1.0  # seconds between a standing-by sync worker's tries for a keeper's slot
ACCEPT_MARGIN = 2  # connections fewer another gthread worker holds: this one does not accept
CLOSE_MARGIN = 3  # ... this one closes connections after their response
BOARD_INTERVAL = 0.1  # seconds at most between a gthread worker's posts on the board
RECHECK = 0.01  # seconds between a gthread worker's looks while it does not accept
BOARD_STALE = 0.5  # seconds after which a post is a worker gone


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
    """``worker-class = plone.recipe.gunicorn.worker.SyncWorker``.

    Serves one request at a time, as gunicorn's sync worker does, but keeps
    connections alive between requests (HTTP/1.1), waiting for them all with
    one ``epoll``: a client's next request costs no new connection.  While a
    request takes longer than ``PASS_ON_AFTER_CPU`` or ``PASS_ON_AFTER``, the
    worker's kept-alive connections are passed (``SCM_RIGHTS``) to whichever
    other worker is free, so that a slow request does not hold them.  Workers
    beyond one per core stand by: they close each connection after its
    response.  Over TLS each connection is closed after its request, as
    gunicorn's worker does.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # in the master, before the fork
        self.passing = passing_channel()
        self.slots = keeper_slots(self.cfg.worker_tmp_dir)

    def init_signals(self):
        super().init_signals()
        signal.signal(signal.SIGALRM, self.pass_on_kept)
        # System calls resume after it (SA_RESTART): a database client
        # library in C need not cope with EINTR.  A wait in poll or on a
        # lock (the ZEO client's) runs the handler at once, a read from a
        # socket once bytes arrive, a C library's wait (libpq's) once it
        # returns.
        signal.siginterrupt(signal.SIGALRM, False)

    def run(self):
        if self.cfg.is_ssl:
            return super().run()  # one connection per request, gunicorn's way
        for listener in self.sockets:
            listener.setblocking(False)
        self.kept = {}  # fd: Connection, waiting for its next request
        self.keeper = False  # holds a keeper's slot: may keep connections
        self.next_try = 0.0
        self.try_to_keep()
        self.armed = False  # the timer runs for the request in the application
        self.poller = selectors.DefaultSelector()
        for listener in self.sockets:
            self.poller.register(listener, selectors.EVENT_READ, listener)
        self.poller.register(self.PIPE[0], selectors.EVENT_READ, WOKEN)
        self.poller.register(self.passing[1], selectors.EVENT_READ, PASSED)
        try:
            while self.alive:
                self.notify()
                events = self.poller.select(self.wait_time())
                if not self.keeper and time.monotonic() >= self.next_try:
                    self.try_to_keep()  # before serving: a slot freed meanwhile
                for key, _ in events:
                    if not self.alive:
                        break
                    if isinstance(key.data, Connection):
                        # Not passed on meanwhile (its number may be reused).
                        if self.kept.get(key.fd) is key.data:
                            self.serve(self.take(key.fd))
                    elif key.data is WOKEN:
                        drain(self.PIPE[0])
                    elif key.data is PASSED:
                        self.take_passed()
                    else:
                        self.accept_one(key.data)
                self.close_idle()
                if not self.is_parent_alive():
                    break
            self.serve_arrived()  # a graceful stop (TERM, HUP, max-requests)
        finally:
            self.disarm()
            self.pass_on()  # to the workers that stay, or that replace this one
            for fd in list(self.kept):
                self.take(fd).sock.close()
            self.poller.close()

    # Over TLS, gunicorn's loop: one connection per request.

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

    # Over TCP and unix sockets: the recipe's loop, with keep-alive.

    def try_to_keep(self):
        """Take a keeper's slot, if one is free: as many workers as cores
        keep connections, the others stand by.  A slot is a POSIX lock on
        one byte of the master's file, which the kernel frees when its
        worker dies; a worker without one tries again after
        ``KEEPER_RETRY`` seconds (after a HUP the old workers hold them
        until they stop)."""
        self.keeper = lock_slot(self.slots, min(self.cfg.workers, cores())) is not None
        if not self.keeper:
            self.next_try = time.monotonic() + KEEPER_RETRY

    def wait_time(self):
        """Seconds until the master's heartbeat is due or a connection's wait ends."""
        wait = self.timeout or 0.5
        if self.kept:
            until = min(conn.deadline for conn in self.kept.values())
            wait = max(0, min(wait, until - time.monotonic()))
        return wait

    def accept_one(self, listener):
        try:
            client, addr = listener.accept()
        except OSError as e:  # another worker took it, or the client left
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED):
                return
            raise
        client.setblocking(True)
        util.close_on_exec(client)
        conn = Connection(client, addr, listener.getsockname())
        arrived = has_arrived(client)
        if arrived is None:  # closed, or reset, before it sent anything
            client.close()
        elif arrived:  # the usual case with TCP_DEFER_ACCEPT
            self.serve(conn)
        else:
            self.keep(conn, self.request_wait)

    def take_passed(self):
        """A connection another worker passed on, if none took it first."""
        try:
            _, fds, _, _ = socket.recv_fds(self.passing[1], 1, 1,
                                           socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.setblocking(True)  # as accepted, for gunicorn's parser
            try:
                conn = Connection(sock, sock.getpeername(), sock.getsockname())
            except OSError:  # the client has gone meanwhile
                sock.close()
                continue
            self.keep(conn, self.cfg.keepalive)

    def serve(self, conn):
        """Serve the request that has arrived on ``conn``, then keep the
        connection for the next one or close it."""
        while True:
            if self.headers_too_slow(conn.sock, conn.addr, conn.read_ahead()):
                conn.sock.close()  # at once: it would not close its end
                return
            req, keep = self.serve_one(conn)
            # A request sent along with the last one (pipelined) is read
            # already: the socket will not say it is there.
            if not (keep and conn.read_ahead()):
                break
        if keep:
            self.keep(conn, self.cfg.keepalive)
        elif req is not None and self.may_close_at_once(req, conn.sock):
            conn.sock.close()
        else:
            util.close_graceful(conn.sock)

    def serve_one(self, conn):
        """The request served (None if none was read) and whether the
        connection may be kept: gunicorn's sync ``handle``."""
        req = None
        try:
            if conn.parser is None:
                conn.parser = http.get_parser(self.cfg, conn.sock, conn.addr)
            req = next(conn.parser)
            keep = self.keep_alive_request(conn, req)
            # A body the application left unread would be read as the next
            # request: close, gracefully, rather than read it.
            return req, keep and body_read(req)
        except http.errors.NoMoreData as e:
            self.log.debug("Ignored premature client disconnection. %s", e)
        except StopIteration as e:
            self.log.debug("Closing connection. %s", e)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except BaseException as e:
            self.handle_error(req, conn.sock, conn.addr, e)
        return req, False

    def keep_alive_request(self, conn, req):
        """gunicorn's sync ``handle_request``, with keep-alive as in its gthread
        worker: whether the connection stays open."""
        environ, resp = {}, None
        held = HeadHeldBack(conn.sock)
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, held, conn.addr, conn.server, self.cfg)
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                self.alive = False
            # A worker on its way out passes its kept connections on.
            if (not self.cfg.keepalive or not self.keeper
                    or not self.alive and self.cfg.workers < 2
                    or len(self.kept) >= self.cfg.worker_connections - 1):
                resp.force_close()
            if self.kept and self.cfg.workers > 1:  # a slow request passes them on
                self.arm()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except OSError:  # the client's: serve_one tells
            raise
        except (Exception, SystemExit):
            if resp is not None and resp.headers_sent:
                # Timeout abort is SystemExit.  The response has begun: a 500
                # on the same socket would corrupt it.
                self.log.exception("Error handling request")
                return False
            raise
        finally:
            if self.armed:
                self.disarm()
            held.flush()  # the head of a response without body
            try:
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")

    def arm(self):
        """Start the timer for the request going into the application."""
        self.armed = True
        self.began = (time.monotonic(), time.thread_time())  # the request's
        signal.setitimer(signal.ITIMER_REAL, PASS_ON_AFTER_CPU, PASS_ON_AFTER_CPU)

    def disarm(self):
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)

    def pass_on_kept(self, signum, frame):
        """SIGALRM, every ``PASS_ON_AFTER_CPU`` while a request runs: once
        it has taken ``PASS_ON_AFTER_CPU`` of CPU (the main thread's: the
        request's) or ``PASS_ON_AFTER`` in all, pass the kept-alive
        connections to the other workers, so that their next requests need
        not wait for it."""
        if not self.armed:
            return
        wall, cpu = self.began
        if (time.thread_time() - cpu >= PASS_ON_AFTER_CPU
                or time.monotonic() - wall >= PASS_ON_AFTER):
            self.disarm()
            self.pass_on()

    def pass_on(self):
        """Pass the kept connections to whichever other worker is free first."""
        if self.cfg.workers < 2:
            return
        for fd in list(self.kept):
            try:
                socket.send_fds(self.passing[0], [b"c"], [fd], socket.MSG_DONTWAIT)
            except OSError:  # the channel is full: keep the rest
                break
            self.take(fd).sock.close()  # the kernel keeps it for the receiver

    def keep(self, conn, seconds):
        """Wait for the connection's next request for up to ``seconds``.
        Nothing of that request has been read (``serve`` goes on with a
        pipelined one, and keeps no connection with a body left unread):
        all of it is in the kernel, so any worker can take the connection."""
        conn.deadline = time.monotonic() + seconds
        self.kept[conn.sock.fileno()] = conn
        self.poller.register(conn.sock, selectors.EVENT_READ, conn)

    def take(self, fd):
        """A kept connection, no longer waited for."""
        conn = self.kept.pop(fd)
        self.poller.unregister(fd)
        return conn

    def close_idle(self):
        """Close the connections that sent nothing in their time."""
        now = time.monotonic()
        for fd, conn in list(self.kept.items()):
            if conn.deadline <= now:
                self.take(fd).sock.close()

    def serve_arrived(self):
        """On the way out: serve the requests that have arrived on kept
        connections."""
        for fd in list(self.kept):
            if has_arrived(self.kept[fd].sock):
                self.serve(self.take(fd))


class Connection:
    """A client connection the sync worker keeps between its requests."""

    __slots__ = ("sock", "addr", "server", "parser", "deadline")

    def __init__(self, sock, addr, server):
        self.sock, self.addr, self.server = sock, addr, server
        self.parser = None  # gunicorn's, made for its first request
        self.deadline = 0.0

    def read_ahead(self):
        """Bytes of the next request read with the last one (pipelining)."""
        return self.parser.unreader.buf.getvalue() if self.parser is not None else b""


WOKEN = object()  # the worker's signal pipe
PASSED = object()  # the channel of connections passed on


def passing_channel():
    """The master's channel for kept-alive connections one worker passes on
    to the others: a datagram socket pair, both ends shared by all workers."""
    global _passing
    if _passing is None:
        _passing = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in _passing:
            end.setblocking(False)
    return _passing


_passing = None


def keeper_slots(directory):
    """The master's file whose bytes the workers lock as keepers' slots."""
    global _slots
    if _slots is None:
        _slots = tempfile.TemporaryFile(dir=directory)
    return _slots


_slots = None


class ConnectionBoard:
    """What each gthread worker holds (connections) and whether it may accept
    (it is not stopping, nor at ``worker_connections``):
    a file the master made, mapped by all workers.  A worker claims a slot
    with a POSIX lock on one byte, which the kernel frees when it dies, and
    posts there; a post older than ``BOARD_STALE`` seconds is a worker gone."""

    ENTRY = struct.Struct("dI?")

    def __init__(self, directory, slots):
        self.slots = slots
        self.file = tempfile.TemporaryFile(dir=directory)
        self.file.truncate(slots * self.ENTRY.size)
        self.map = mmap.mmap(self.file.fileno(), slots * self.ENTRY.size)

    def claim(self):
        """A free slot, emptied, or None when all are taken."""
        slot = lock_slot(self.file, self.slots)
        if slot is not None:
            self.post(slot, 0, False)
        return slot

    def post(self, slot, held, may_accept):
        self.ENTRY.pack_into(self.map, slot * self.ENTRY.size, time.monotonic(), held, may_accept)

    def others(self, slot):
        """(connections held, may accept) of the other workers alive."""
        recent = time.monotonic() - BOARD_STALE
        for other in range(self.slots):
            if other != slot:
                posted, held, may_accept = self.ENTRY.unpack_from(self.map, other * self.ENTRY.size)
                if posted > recent:
                    yield held, may_accept


def connection_board(directory, workers):
    """The master's board for its gthread workers: slots for twice as many
    as it runs, as old and new workers overlap after a HUP."""
    global _board
    if _board is None:
        _board = ConnectionBoard(directory, 2 * workers + 2)
    return _board


_board = None


def lock_slot(file, count):
    """The first of ``count`` slots of ``file`` (a POSIX lock on its byte
    of that number) this process could take, or None; the kernel frees it
    when the process dies."""
    for slot in range(count):
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
        except OSError:  # another worker's
            continue
        return slot
    return None


def cores():
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def drain(fd):
    try:
        os.read(fd, 64)
    except OSError:
        pass


def has_arrived(sock):
    """Whether bytes from the client are there (True), not yet (False), or
    the client has closed or reset the connection (None)."""
    try:
        return True if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else None
    except BlockingIOError:
        return False
    except OSError:
        return None


class ThreadWorker(ClientLimits, gthread.ThreadWorker):
    """``worker-class = plone.recipe.gunicorn.worker.ThreadWorker``.

    gunicorn's gthread worker keeps a connection alive with the worker that
    accepted it, and accepts whenever its main thread is free: of a burst of
    new connections (a load balancer's pool, a load generator) one worker
    may take most and keep them, its threads taking turns at one core while
    the other workers idle.  With several workers the recipe's stops
    accepting while another worker, not stopping, holds ``ACCEPT_MARGIN``
    (2) connections fewer, and while one holds ``CLOSE_MARGIN`` (3) fewer
    closes connections after their response; the kernel hands new
    connections to the workers that accept.  The workers tell one another
    what they hold on a board the master made (``ConnectionBoard``), every
    ``BOARD_INTERVAL`` at least, and one that does not accept looks again
    every ``RECHECK``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # in the master, before the fork
        self.board = (connection_board(self.cfg.worker_tmp_dir, self.cfg.workers)
                      if self.cfg.workers > 1 else None)
        self.slot = None  # the board's, once claimed; None: accept as gunicorn's

    def init_process(self):
        if self.board is not None:
            self.slot = self.board.claim()
        super().init_process()  # runs the worker until it exits

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled and not self.more_than_share(ACCEPT_MARGIN))

    def wait_for_and_dispatch_events(self, timeout):
        if self.slot is None:
            return super().wait_for_and_dispatch_events(timeout)
        if self._accepting and self.more_than_share(ACCEPT_MARGIN):
            super().set_accept_enabled(False)
        self.board.post(self.slot, self.nr_conns,
                        self.alive and self.nr_conns < self.worker_connections)
        return super().wait_for_and_dispatch_events(
            min(timeout, RECHECK if self.alive and not self._accepting else BOARD_INTERVAL))

    def more_than_share(self, margin):
        """Whether another worker that may accept holds ``margin`` connections
        fewer than this one."""
        return self.slot is not None and any(
            may_accept and held + margin <= self.nr_conns
            for held, may_accept in self.board.others(self.slot))

    def handle_request(self, req, conn):
        if self.more_than_share(CLOSE_MARGIN):
            # Kept connections stay with their worker: those a worker took
            # alone (the others loading Zope, or stopped) would stay with it
            # for good.  Its client connects again, to a worker that accepts.
            # (A margin wider than for accepting: a burst's passing
            # unevenness costs no new connections.)
            req.force_close()
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
    return (body_read(req)
            and not req.unreader.buf.getvalue()  # nothing read beyond it
            and nothing_waiting(client))  # nor in the kernel


def body_read(req):
    """Whether the request's body was read to its end (none is, as well)."""
    body = req.body.reader
    return isinstance(body, LengthReader) and body.length == 0


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
