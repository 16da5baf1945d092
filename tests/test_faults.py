"""Faults under load: signals, a killed worker, a restarted ZEO server, and the
run-time files that let two servers live side by side.

Each load runs from a second process (``loadgen.py``), bounded in time, against
a real ZEO server and a gunicorn master with two workers.
"""

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from conftest import (ADMIN, EGGS, REPO, Buildout, children, data_segments_in, eventually,
                      free_port, lingering_clients, logged_error, read_response, request, run_script,
                      running, trickling_clients, wait_for_port, wait_until_serving)

LOADGEN = Path(__file__).with_name("loadgen.py")
GRACEFUL_TIMEOUT = 10
WRITER_FOLDERS = 6


@pytest.fixture(scope="module")
def zeo(new_buildout):
    """gunicorn.cfg, plus a second gunicorn part serving the same ZEO client."""
    http, http2, zeo = free_port(), free_port(), free_port()
    buildout = new_buildout("faults", f"""
        [buildout]
        extends = {REPO}/gunicorn.cfg
        parts += gunicorn-2

        [zeoserver]
        zeo-address = 127.0.0.1:{zeo}

        [instance]
        http-address = 127.0.0.1:{http}

        [gunicorn]
        graceful-timeout = {GRACEFUL_TIMEOUT}

        [gunicorn-2]
        recipe = plone.recipe.gunicorn
        bind = 127.0.0.1:{http2}
        workers = 1
    """)
    buildout.run()
    buildout.address = f"127.0.0.1:{http}"
    buildout.address2 = f"127.0.0.1:{http2}"
    buildout.zeo_address = f"127.0.0.1:{zeo}"
    return buildout


class Site:
    """A running ZEO server and gunicorn master of the ``zeo`` buildout."""

    def __init__(self, buildout, start, args=()):
        self.buildout, self.start = buildout, start
        self.address = buildout.address
        self.start_zeoserver()
        self.gunicorn = start([buildout.path("bin", "gunicorn-instance"), *args], buildout.dir,
                              name="gunicorn")
        assert wait_until_serving(self.gunicorn, self.address) == 200
        self.wait_for_workers(2)

    def start_zeoserver(self):
        self.zeoserver = self.start([self.buildout.path("bin", "zeoserver"), "fg"],
                                    self.buildout.dir, name="zeoserver")
        wait_for_port(self.buildout.zeo_address)

    def wait_for_workers(self, count, other_than=(), timeout=60):
        def new_workers():
            workers = set(self.gunicorn.workers()) - set(other_than)
            return workers if len(workers) >= count else None
        return eventually(new_workers, timeout,
                          lambda: f"expected {count} new workers:\n{self.gunicorn.output()}")

    def ensure_folders(self):
        for k in range(WRITER_FOLDERS):
            status, _ = request(self.address, "/manage_addProduct/OFSP/manage_addFolder", "POST",
                                urllib.parse.urlencode({"id": f"f{k}"}), auth=ADMIN)
            assert status in (200, 302, 400), status  # 400: exists from an earlier test

    def load(self, seconds, concurrency=10, writes=0):
        """Start a bounded load in a second process; ``.result()`` waits for it."""
        return Load(self.address, seconds, concurrency, writes, self.buildout.dir, self.start)


class Load:
    """A load generator process, started like the servers: stopped when the test ends."""

    def __init__(self, address, seconds, concurrency, writes, directory, start):
        self.out = Path(directory) / f"load-{time.monotonic_ns()}.json"
        self.process = start(
            [sys.executable, LOADGEN, address, "--seconds", seconds, "--concurrency",
             concurrency, "--writes", writes, "--out", self.out], directory, name="load")

    def result(self):
        status = self.process.proc.wait(timeout=180)
        assert status == 0, self.process.output()
        return json.loads(self.out.read_text())


@pytest.fixture
def site(zeo, servers):
    return Site(zeo, servers)


def summary(result):
    return (f"{result['sent']} requests sent, {result['ok']} answered, "
            f"{result['failed']} failed {result['outcomes']}")


def test_hup_replaces_workers_without_failing_a_request(site, figures):
    before = set(site.gunicorn.workers())
    load = site.load(seconds=8)
    time.sleep(2.5)
    site.gunicorn.signal(signal.SIGHUP)
    replaced = site.wait_for_workers(2, other_than=before)
    result = load.result()
    figures(f"HUP under load: {summary(result)}; workers {sorted(before)} -> {sorted(replaced)}")
    assert result["failed"] == 0
    assert result["ok"] > 100
    assert not before & set(site.gunicorn.workers())


def test_hup_fails_no_request_on_a_kept_alive_connection(site, figures):
    """A client that keeps its connection alive across a reload (HUP) gets
    every answer: the old workers pass their kept connections on as they
    stop, where gunicorn's close them and the client's next request finds
    the connection gone.  (A new worker may answer ``Connection: close``
    until it is a keeper; the client then opens a new one, as HTTP says.)"""
    before = set(site.gunicorn.workers())
    host, _, port = site.address.rpartition(":")
    statuses, reconnects = [], 0
    conn = socket.create_connection((host, int(port)), timeout=30)
    reader = conn.makefile("rb")
    try:
        def get():
            nonlocal conn, reader, reconnects
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, fields, _ = read_response(reader)
            statuses.append(status)
            if fields.get("connection") == "close":
                conn.close()
                conn = socket.create_connection((host, int(port)), timeout=30)
                reader = conn.makefile("rb")
                reconnects += 1
        get()
        site.gunicorn.signal(signal.SIGHUP)
        began = time.monotonic()
        while before & set(site.gunicorn.workers()) or time.monotonic() - began < 1:
            assert time.monotonic() - began < 60, "the old workers did not stop"
            time.sleep(0.2)
            get()
        replaced = set(site.gunicorn.workers())
        for _ in range(8):
            time.sleep(0.2)
            get()
        last = server_process_of(conn, replaced)
    finally:
        conn.close()
    figures(f"HUP with a client sending a request every 0.2s on a kept-alive connection: "
            f"{len(statuses)} requests, {statuses.count('HTTP/1.1 200 OK')} answered 200, "
            f"{reconnects} new connections after Connection: close; "
            f"workers {sorted(before)} -> {sorted(replaced)}; the connection ends with {last}")
    assert statuses == ["HTTP/1.1 200 OK"] * len(statuses)
    assert not before & replaced and last in replaced


def test_killed_worker_is_replaced_and_costs_at_most_its_requests(site, figures):
    before = site.gunicorn.workers()
    victim = before[0]
    load = site.load(seconds=8, concurrency=10)
    time.sleep(2.5)
    os.kill(victim, signal.SIGKILL)
    replacement = site.wait_for_workers(1, other_than=before)
    result = load.result()
    figures(f"SIGKILL of worker {victim} under load: {summary(result)}; "
            f"replaced by {sorted(replacement)}")
    # Only requests the killed worker held can fail: at most every connection
    # open at that moment, which the load's concurrency bounds.
    assert result["failed"] <= 10
    late = [ok for sent_at, ok in result["timeline"] if sent_at > 5]
    assert late and all(late), "service did not recover after the worker was replaced"
    assert len(site.gunicorn.workers()) == 2


def test_term_lets_the_request_in_flight_finish(site, figures):
    site.ensure_folders()
    host, port = site.address.split(":")
    body = urllib.parse.urlencode({"title": "written while stopping"}).encode()
    # A request in flight: headers and half the body now, the rest after TERM.
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(
        b"POST /f0/manage_changeProperties HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: " + ADMIN.encode() + b"\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:5])
    time.sleep(1)
    stopping = time.monotonic()
    site.gunicorn.signal(signal.SIGTERM)
    time.sleep(1)
    conn.sendall(body[5:])
    answer = b""
    while chunk := conn.recv(65536):
        answer += chunk
    conn.close()
    status = site.gunicorn.proc.wait(timeout=GRACEFUL_TIMEOUT + 5)
    took = time.monotonic() - stopping
    figures(f"TERM with a request in flight: answered {answer.split(b' ', 2)[1].decode()}, "
            f"master exited {status} after {took:.1f}s (graceful_timeout {GRACEFUL_TIMEOUT}s)")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert status == 0
    assert took <= GRACEFUL_TIMEOUT


def test_silent_clients_hold_no_worker(site, figures):
    """Connections that send nothing (a browser's preconnects, a TCP health
    check) leave the site answering, and the server closes them; a client
    that sends its request a second after connecting is served."""
    host, port = site.address.split(":")
    began = time.monotonic()
    silent = [socket.create_connection((host, int(port))) for _ in range(3)]  # 2 workers
    try:
        status, _ = request(site.address, timeout=30)
        answered = time.monotonic() - began
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            time.sleep(1)
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            slow_answer = slow.recv(12)
        closed = []
        for conn in silent:
            conn.settimeout(60)
            assert conn.recv(1) == b""  # closed by the server
            closed.append(time.monotonic() - began)
    finally:
        for conn in silent:
            conn.close()
    figures(f"3 silent connections to 2 workers: a request answered {status} after "
            f"{answered:.2f}s; the server closed them after "
            f"{', '.join(f'{t:.1f}' for t in closed)}s (worker timeout 300s)")
    assert status == 200
    # gunicorn's own sync worker waits for the first silent client's request
    # until the worker timeout; none may hold a worker for keepalive (2s).
    assert answered < 2
    assert slow_answer == b"HTTP/1.1 200"
    assert max(closed) < 30
    assert "Traceback" not in site.gunicorn.output()


def test_trickling_clients_hold_a_worker_for_seconds_only(site, figures):
    """Clients that send their request headers a byte at a time, without end
    ("slowloris"), lose their connections after the header timeout (10 s)
    instead of holding the workers until the worker timeout (300 s)."""
    with trickling_clients(site.address, 2) as closed:  # 2 workers
        began = time.monotonic()
        status, _ = request(site.address, timeout=60)
        answered = time.monotonic() - began
    figures(f"2 clients trickling their headers to 2 workers: a request answered {status} "
            f"after {answered:.1f}s; the server closed them after "
            f"{', '.join(f'{t:.1f}' for t in sorted(closed))}s")
    assert status == 200
    # gunicorn's own sync worker serves them for as long as they trickle (25 s);
    # the recipe's closes them about 10 s after their first bytes (the margin
    # is for a busy machine).
    assert answered < 18
    assert len(closed) == 2 and max(closed) < 18
    assert "Traceback" not in site.gunicorn.output()


def test_clients_slow_to_close_hold_no_worker(site, figures):
    """A client that has its whole response but closes its end late (a far
    client's FIN comes a round trip later) does not keep a worker waiting."""
    with lingering_clients(site.address, 2):  # 2 workers
        began = time.monotonic()
        status, _ = request(site.address, timeout=30)
        answered = time.monotonic() - began
    figures(f"2 clients holding their connections open after their responses, "
            f"2 workers: the next request answered {status} after {answered:.3f}s")
    assert status == 200
    # gunicorn's own sync worker waits up to 2s for each of them to close.
    assert answered < 1


BIG_BODY = 200_000  # bytes: more than the sync worker joins to the head


def whole_response(address, head):
    """Send one request ``head``; the whole response, and the number of TCP
    segments with data it came in."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
        segments = data_segments_in(conn)
    return response, segments


def server_process_of(conn, pids):
    """Which of ``pids`` holds the server's end of the TCP connection ``conn``
    (IPv4), from /proc/net/tcp and the processes' file descriptors."""
    client_port = conn.getsockname()[1]
    server_port = conn.getpeername()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.rpartition(":")[2], 16) for f in fields[1:3])
        if (local, remote) == (server_port, client_port):
            inode = fields[9]
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:  # closed meanwhile
                pass
    return None


def test_connections_are_kept_alive_between_requests(site, figures):
    """The sync workers keep a connection open for the client's next request
    (HTTP/1.1), as waitress does: a new connection per request cost a fifth
    of the throughput.  One that stays silent is closed after keep-alive
    (gunicorn's 2 s)."""
    host, _, port = site.address.rpartition(":")
    standing_by = 0  # answers from the worker that does not keep connections
    while True:
        assert standing_by < 20
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            reader = conn.makefile("rb")
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answers = [read_response(reader)]
            if answers[0][1]["connection"] == "close":
                standing_by += 1
                continue
            for method in ("HEAD", "GET", "GET"):
                conn.sendall(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                answers.append(read_response(reader, method))
            idle = time.monotonic()
            assert reader.read(1) == b""  # the server closes it
            closed_after = time.monotonic() - idle
            break
    figures(f"4 requests on one connection: {[a[0] for a in answers]}; closed "
            f"{closed_after:.1f}s after the last response ({standing_by} first answered "
            f"by the worker standing by, with Connection: close)")
    for status, fields, body in answers:
        assert status == "HTTP/1.1 200 OK"
        assert fields["connection"] == "keep-alive"
    assert answers[0][2].rstrip().endswith(b"</html>") and answers[1][2] == b""
    assert answers[2][2] == answers[0][2]
    assert 1.5 < closed_after < 10


def test_pipelined_requests_are_answered_and_keep_alive_0_closes(zeo, site, servers, figures):
    """Requests a client sends in one go (pipelined) are all answered, in
    order, on the kept connection; with ``--keep-alive 0`` every response
    closes its connection, as gunicorn's sync worker does."""
    host, _, port = zeo.address2.rpartition(":")
    pipelined = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
                 + b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
    answers = {}
    for args in ([], ["--keep-alive", "0"]):
        server = servers([zeo.path("bin", "gunicorn-2-instance"), *args], zeo.dir,
                         name="gunicorn-2")
        assert wait_until_serving(server, zeo.address2) == 200
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            reader = conn.makefile("rb")
            conn.sendall(pipelined if not args else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answers[bool(args)] = [read_response(reader, method)
                                   for method in (("GET", "HEAD", "GET") if not args else ("GET",))]
            answers[bool(args)].append(reader.read(1))  # b"": closed
        server.stop()
    kept, closed = answers[False], answers[True]
    figures(f"3 pipelined requests, 1 worker: {[a[0] for a in kept[:3]]}; "
            f"with --keep-alive 0: {closed[0][0]}, Connection: {closed[0][1]['connection']}")
    assert [a[0] for a in kept[:3]] == ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK",
                                        "HTTP/1.1 404 Not Found"]
    assert kept[0][2].rstrip().endswith(b"</html>") and kept[1][2] == b""
    assert kept[2][1]["connection"] == "keep-alive"
    assert closed[0][0] == "HTTP/1.1 200 OK" and closed[0][1]["connection"] == "close"
    assert closed[1] == b""


SLOW_LOOP = 400_000  # DTML loop turns: about a second on this machine


@contextlib.contextmanager
def two_kept_by_one_worker(site):
    """The worker that keeps two of the connections opened, those two, and
    each connection's reader; closes all of them on leaving."""
    host, _, port = site.address.rpartition(":")
    workers = site.gunicorn.workers()
    readers, held = {}, {}
    try:
        # Of two workers one keeps connections, the other stands by and
        # closes them: open connections until the keeper holds two.
        while max(map(len, held.values()), default=0) < 2:
            assert len(readers) < 40, held
            conn = socket.create_connection((host, int(port)), timeout=60)
            readers[conn] = conn.makefile("rb")
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, fields, _ = read_response(readers[conn])
            assert status == "HTTP/1.1 200 OK"
            if fields["connection"] == "keep-alive":
                held.setdefault(server_process_of(conn, workers), []).append(conn)
        worker, (first, second, *_) = max(held.items(), key=lambda item: len(item[1]))
        assert worker in workers, held
        yield worker, first, second, readers
    finally:
        for conn in readers:
            conn.close()


def asked_meanwhile(conn, reader, workers):
    """0.2 s on, a request on ``conn``: the answer's status, how long it
    took, and which of the ``workers`` has the connection then."""
    time.sleep(0.2)
    sent = time.monotonic()
    conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status = read_response(reader)[0]
    took = time.monotonic() - sent
    return status, took, server_process_of(conn, workers)


def test_a_slow_request_does_not_hold_its_workers_other_connections(site, figures):
    """A kept-alive connection waits in the worker that served it.  When that
    worker is held by a slow request, its other connections are passed to a
    free worker, whose answer comes long before the slow one."""
    status, text = request(site.address, "/manage_addProduct/OFSP/addDTMLMethod", "POST",
                           urllib.parse.urlencode({"id": "slow", "file": (
                               f'<dtml-in expr="_.range({SLOW_LOOP})"></dtml-in>slow')}),
                           auth=ADMIN)
    assert status in (200, 302, 400), (status, text[:300])  # 400: exists from an earlier test
    workers = site.gunicorn.workers()
    with two_kept_by_one_worker(site) as (worker, slow, fast, readers):
        began = time.monotonic()
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        fast_status, fast_took, now_held_by = asked_meanwhile(fast, readers[fast], workers)
        slow_status, _, slow_body = read_response(readers[slow])
        slow_took = time.monotonic() - began
    figures(f"a slow request ({slow_took:.2f}s) on one of worker {worker}'s kept-alive "
            f"connections; another of them answered {fast_took * 1000:.0f}ms after its "
            f"request, by worker {now_held_by}")
    assert slow_status == fast_status == "HTTP/1.1 200 OK" and slow_body == b"slow"
    assert slow_took > 0.5  # slow enough to tell
    # Without passing it on, the answer would wait for the slow request.
    assert fast_took < slow_took / 3
    assert now_held_by != worker  # the other's, or closed by it (standing by)


def test_a_request_that_waits_does_not_hold_its_workers_other_connections(site, figures):
    """A request can be slow without computing: here its body trickles in,
    a byte every 0.1 s, and the worker waits for it, using no CPU.  Its
    worker's other kept connections are passed on all the same (after
    ``PASS_ON_AFTER``, once a read returns: system calls resume after the
    timer's signal)."""
    workers = site.gunicorn.workers()
    body = urllib.parse.urlencode({"x": "y" * 98}).encode()

    def trickle(sock):
        for byte in body[:10]:
            time.sleep(0.1)
            sock.sendall(bytes([byte]))
        sock.sendall(body[10:])

    with two_kept_by_one_worker(site) as (worker, waiting, fast, readers):
        began = time.monotonic()
        waiting.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: "
                        b"application/x-www-form-urlencoded\r\nContent-Length: "
                        + str(len(body)).encode() + b"\r\n\r\n")
        sender = threading.Thread(target=trickle, args=(waiting,))
        sender.start()
        try:
            fast_status, fast_took, now_held_by = asked_meanwhile(fast, readers[fast], workers)
        finally:
            sender.join()
        waiting_status = read_response(readers[waiting])[0]
        waiting_took = time.monotonic() - began
    figures(f"a request whose body came in {waiting_took:.2f}s on one of worker {worker}'s "
            f"kept-alive connections; another of them answered {fast_took * 1000:.0f}ms "
            f"after its request, by worker {now_held_by}")
    assert waiting_status == fast_status == "HTTP/1.1 200 OK"
    assert fast_took < 0.5  # not the second the body took
    assert now_held_by != worker


THREADED = ["-k", "plone.recipe.gunicorn.worker.ThreadWorker", "--threads", "4"]


def kept_connections(address, count):
    """``count`` connections opened at once, each answered and kept alive,
    and how many the server closed after their first answer (each of those
    opened again, as a client does)."""
    host, _, port = address.rpartition(":")
    kept, closed = [], 0
    while len(kept) < count:
        assert closed < 10 * count, f"{closed} connections closed after one answer"
        conns = [socket.create_connection((host, int(port)), timeout=60)
                 for _ in range(count - len(kept))]
        for conn in conns:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        for conn in conns:
            status, fields, _ = read_response(conn.makefile("rb"))
            assert status == "HTTP/1.1 200 OK"
            if fields["connection"] == "keep-alive":
                kept.append(conn)
            else:
                conn.close()
                closed += 1
    return kept, closed


def held_by(conns, workers):
    """How many of ``conns`` each of the ``workers`` holds."""
    held = [server_process_of(conn, workers) for conn in conns]
    return {worker: held.count(worker) for worker in workers}


def test_gthread_workers_share_out_kept_connections(zeo, servers, figures):
    """gunicorn's gthread worker keeps a connection with the worker that
    accepted it, and one of several may take most of a burst of new
    connections (a load balancer opening its pool), or all of those opened
    while the others could not accept, and serve them on one core while the
    others idle.  The recipe's share them out as they come, and a worker
    that holds more than its share closes connections after their response
    until it does not: their clients connect again, to the others."""
    site = Site(zeo, servers, THREADED)
    eventually(lambda: site.gunicorn.output().count("Ready to handle requests") >= 2, 60,
               site.gunicorn.output)
    workers = site.gunicorn.workers()
    conns, burst_closed = kept_connections(site.address, 20)
    try:
        burst = held_by(conns, workers)
    finally:
        for conn in conns:
            conn.close()

    paused, other = workers
    os.kill(paused, signal.SIGSTOP)
    try:
        time.sleep(1)  # its post on the board is stale: as gone
        conns, alone_closed = kept_connections(site.address, 20)
    finally:
        os.kill(paused, signal.SIGCONT)
    try:
        alone = held_by(conns, workers)
        reconnected = 0
        for _ in range(5):  # each client asks again; connects again when told
            for k, conn in enumerate(conns):
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, fields, _ = read_response(conn.makefile("rb"))
                assert status == "HTTP/1.1 200 OK"
                if fields["connection"] == "close":
                    conn.close()
                    (conns[k],), _ = kept_connections(site.address, 1)
                    reconnected += 1
        shared = held_by(conns, workers)
    finally:
        for conn in conns:
            conn.close()
    figures(f"20 connections opened at once to 2 gthread workers, kept: {burst} "
            f"({burst_closed} closed after their first answer and opened again); "
            f"opened while worker {paused} was stopped: {alone}, then after 5 requests "
            f"each ({reconnected} connections closed and opened again): {shared}")
    assert sum(burst.values()) == 20 and min(burst.values()) >= 8, burst
    assert alone == {paused: 0, other: 20} and alone_closed == 0
    assert sum(shared.values()) == 20 and min(shared.values()) >= 8, shared


def test_head_and_body_go_out_together(site, figures):
    """gunicorn sends a response's head and its body in two writes, and the
    client wakes for each; the recipe's sync worker sends them in one.  A
    response without body and one larger than it joins arrive whole."""
    status, text = request(site.address, "/manage_addProduct/OFSP/addDTMLMethod", "POST",
                           urllib.parse.urlencode({"id": "big", "file": (
                               '<dtml-in expr="_.range(%d)">%s\n</dtml-in>'
                               % (BIG_BODY // 100, "x" * 99))}), auth=ADMIN)
    assert status in (200, 302, 400), (status, text[:300])  # 400: exists from an earlier test
    close = b"Host: x\r\nConnection: close\r\n\r\n"
    get, get_segments = whole_response(site.address, b"GET / HTTP/1.1\r\n" + close)
    head, head_segments = whole_response(site.address, b"HEAD / HTTP/1.1\r\n" + close)
    big, _ = whole_response(site.address, b"GET /big HTTP/1.1\r\n" + close)
    figures(f"TCP segments with data per response: GET / ({len(get)} bytes) {get_segments}, "
            f"HEAD / {head_segments}; GET /big: {len(big)} bytes")
    assert get.startswith(b"HTTP/1.1 200 OK\r\n") and get.rstrip().endswith(b"</html>")
    assert get_segments == 1
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert head_segments == 1
    big_head, _, big_body = big.partition(b"\r\n\r\n")
    assert big_head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {BIG_BODY}".encode() in big_head.split(b"\r\n")
    assert big_body == (b"x" * 99 + b"\n") * (BIG_BODY // 100)


def test_usr1_reopens_logs_after_rotation(site, figures):
    log_dir = site.buildout.path("var", "log")
    event, access = log_dir / "gunicorn.log", log_dir / "gunicorn-access.log"
    event.rename(log_dir / "gunicorn.log.1")
    access.rename(log_dir / "gunicorn-access.log.1")
    site.gunicorn.signal(signal.SIGUSR1)
    eventually(lambda: event.exists() and "Handling signal: usr1" in event.read_text(), 10,
               "the event log was not reopened")
    for _ in range(20):
        assert request(site.address, "/rotated")[0] == 404
    time.sleep(0.5)
    rotated_lines = (log_dir / "gunicorn-access.log.1").read_text().count("/rotated")
    new_lines = access.read_text().count("/rotated")
    figures(f"USR1 after rotation: {new_lines} of 20 requests in the new access log, "
            f"{rotated_lines} in the rotated one")
    assert (new_lines, rotated_lines) == (20, 0)


def cannot_reopen(output, path):
    """The lines saying that a process could not open ``path`` anew."""
    return [line for line in output.splitlines()
            if line.startswith(f"plone.recipe.gunicorn: cannot open the log file {path} anew")]


def test_a_log_directory_gone_fails_no_request(site, figures):
    # Python's WatchedFileHandler raises into the request that logs when it
    # cannot open its file anew: every request's connection was dropped.
    log_dir = site.buildout.path("var", "log")
    moved = site.buildout.path("var", "log.moved")
    log_dir.rename(moved)
    try:
        answers = [request(site.address, "/gone")[0] for _ in range(20)]
    finally:
        log_dir.mkdir()
    output = site.gunicorn.output()
    said = cannot_reopen(output, log_dir / "gunicorn-access.log")
    figures(f"var/log gone: {answers.count(404)} of 20 requests answered; "
            f"{len(said)} lines said so: {said[:1]}")
    assert answers == [404] * 20
    # Once per worker that served, and no traceback.
    assert 1 <= len(said) <= 2 and all("anew (No such file or directory)" in line for line in said)
    assert "Traceback" not in output and "Logging error" not in output
    # Nothing was lost: the workers wrote on to the files they had open.
    assert (moved / "gunicorn-access.log").read_text().count("/gone") == 20
    # USR1, once there is a directory again, puts the lines there.
    site.gunicorn.signal(signal.SIGUSR1)
    access = log_dir / "gunicorn-access.log"
    eventually(lambda: access.exists(), 10, "no new access log after USR1")
    time.sleep(0.5)  # the workers handle USR1 too
    for _ in range(10):
        assert request(site.address, "/back")[0] == 404
    eventually(lambda: access.read_text().count("/back") == 10, 5,
               lambda: f"the new access log: {access.read_text()!r}")


# A Python that every user may run: the workers of the next test run as
# nobody, who cannot read a Python installed under /root (pyenv's, here).
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def nobodys_site():
    """A FileStorage buildout that other users can read, from a virtualenv of
    Debian's Python, whose gunicorn part runs its workers as nobody."""
    for path in (EGGS, REPO):  # the eggs and the develop egg the workers import
        assert path.stat().st_mode & 0o005 == 0o005, f"{path} is not readable by other users"
    top = Path(tempfile.mkdtemp(prefix="gunicorn-nobody-"))
    try:
        top.chmod(0o755)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", top / "venv"], check=True, timeout=120)
        subprocess.run([top / "venv" / "bin" / "pip", "install", "--quiet", "-r",
                        REPO / "requirements.txt"], check=True, timeout=300)
        buildout = Buildout(top / "site", script=top / "venv" / "bin" / "buildout")
        buildout.address = f"127.0.0.1:{free_port()}"
        buildout.write(f"""
            [buildout]
            extends = {REPO}/buildout.cfg
            [instance]
            http-address = {buildout.address}
            [gunicorn]
            user = nobody
            group = nogroup
        """)
        buildout.run()
        # The database is nobody's to write, as the integrator makes it (the
        # start-up error says so when it is not).
        for name in ("filestorage", "blobstorage", "cache"):
            subprocess.run(["chown", "-R", "nobody:nogroup", buildout.path("var", name)],
                           check=True)
        yield buildout
    finally:
        shutil.rmtree(top)


def owner(path):
    return pwd.getpwuid(path.stat().st_uid).pw_name


def test_workers_run_as_another_user_log_across_rotation(nobodys_site, servers, figures):
    site = nobodys_site
    gunicorn = servers([site.path("bin", "gunicorn-instance")], site.dir, name="gunicorn")
    assert wait_until_serving(gunicorn, site.address) == 200
    [worker] = gunicorn.workers()
    uids = next(line for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                if line.startswith("Uid:")).split()[1:]
    assert uids == [str(pwd.getpwnam("nobody").pw_uid)] * 4
    log_dir = site.path("var", "log")
    event, access = log_dir / "gunicorn.log", log_dir / "gunicorn-access.log"
    # The master (root) opened the logs; the worker must be able to reopen them.
    assert (owner(event), owner(access)) == ("nobody", "nobody")
    # logrotate (without create) moves them; the worker cannot create a file
    # in root's var/log and writes on to the moved one until USR1.
    event.rename(log_dir / "gunicorn.log.1")
    access.rename(log_dir / "gunicorn-access.log.1")
    answers = [request(site.address, "/rotating")[0] for _ in range(20)]
    said = cannot_reopen(gunicorn.output(), access)
    assert answers == [404] * 20
    assert len(said) == 1 and "anew (Permission denied)" in said[0], said
    gunicorn.signal(signal.SIGUSR1)
    eventually(lambda: event.exists() and access.exists(), 10, "no new logs after USR1")
    assert (owner(event), owner(access)) == ("nobody", "nobody")
    time.sleep(0.5)  # the worker handles USR1 too
    answers = [request(site.address, "/rotated")[0] for _ in range(20)]
    assert answers == [404] * 20
    eventually(lambda: access.read_text().count("/rotated") == 20, 5,
               lambda: f"the new access log: {access.read_text()!r}")
    rotated = (log_dir / "gunicorn-access.log.1").read_text()
    figures(f"workers as nobody, logs rotated: 40 of 40 requests answered, "
            f"{rotated.count('/rotating')} logged to the moved file before USR1, "
            f"{access.read_text().count('/rotated')} to the new one after")
    assert rotated.count("/rotating") == 20 and "/rotated" not in rotated
    output = gunicorn.output()
    assert "Traceback" not in output and "Logging error" not in output


def test_check_loads_zope_as_the_workers_user(nobodys_site):
    # check, run by root, used to load Zope as root: it said OK where the
    # workers could not open the database, and the Data.fs it created was
    # root's, which no worker could open afterwards.
    site = nobodys_site
    storage = site.path("var", "filestorage")
    for path in storage.iterdir():
        path.unlink()
    status, output = run_script(site, "check", timeout=120)
    assert status == 0, output
    assert "configuration and application OK, as user nobody: 1 workers" in output
    assert {owner(path) for path in storage.iterdir()} == {"nobody"}
    # A directory the workers may not write: check says so, as they would.
    for path in storage.iterdir():
        path.unlink()
    shutil.chown(storage, "root", "root")
    try:
        status, output = run_script(site, "check", timeout=120)
    finally:
        shutil.chown(storage, "nobody", "nogroup")
    assert status != 0
    assert output.splitlines() == [
        f"gunicorn-instance: the application does not load: [Errno 13] Permission denied: "
        f"'{storage / 'Data.fs.lock'}': the server runs as user nobody, who may not write "
        "there; give that user the directory and its files (chown -R), or start the server "
        "as its owner"], output


def test_usr2_starts_a_new_master_that_takes_over(site, figures):
    """gunicorn's upgrade without a lost connection: USR2 starts a new master
    with new code on the same sockets, then TERM to the old one."""
    pidfile = site.buildout.path("var", "gunicorn.pid")
    old = site.gunicorn.pid
    site.gunicorn.signal(signal.SIGUSR2)
    new_pidfile = pidfile.with_name("gunicorn.pid.2")

    def new_master_with_workers():
        new = new_pidfile.exists() and int(new_pidfile.read_text())
        return new if new and len(children(new)) == 2 else None
    new = eventually(new_master_with_workers, 60, lambda: site.gunicorn.output()[-3000:], 0.2)
    load = site.load(seconds=6)
    time.sleep(1.5)
    os.kill(old, signal.SIGTERM)  # the old master and its workers go; the new ones serve
    result = load.result()
    assert site.gunicorn.proc.wait(timeout=60) == 0
    eventually(lambda: int(pidfile.read_text()) == new, 10,  # promoted: it takes the pid file
               "the new master did not take the pid file")
    figures(f"USR2, then TERM to the old master under load: {summary(result)}")
    assert result["failed"] == 0 and result["ok"] > 100
    assert request(site.address, "/")[0] == 200
    os.kill(new, signal.SIGTERM)
    eventually(lambda: not running(new), 30, "the new master did not stop")


def test_zeo_restart_under_load_loses_no_acknowledged_write(site, zeo, figures):
    site.ensure_folders()
    load = site.load(seconds=14, concurrency=WRITER_FOLDERS, writes=WRITER_FOLDERS)
    time.sleep(3)
    assert site.zeoserver.stop() in (0, -15)
    time.sleep(2)
    site.start_zeoserver()
    result = load.result()
    late = [ok for sent_at, ok in result["timeline"] if sent_at > 11]
    assert request(site.address, "/")[0] == 200
    assert site.gunicorn.stop() == 0
    assert site.zeoserver.stop() in (0, -15)

    interpreter = zeo.path("parts", "instance", "bin", "interpreter")
    present = set(json.loads(run(interpreter, "-c", OBJECTS.format(
        path=str(zeo.path("var", "filestorage", "Data.fs")), folders=WRITER_FOLDERS))))
    lost = [w for w in result["acked_writes"] if w not in present]
    figures(f"ZEO server restarted under write load: {summary(result)}; "
            f"{len(result['acked_writes'])} writes acknowledged, {len(lost)} lost")
    assert result["acked_writes"] and not lost
    # Resumed: nearly every request of the last seconds answered (a write whose
    # commit reached the server just as its connection went may answer 400
    # on Zope's retry: "id already in use"; that write is in the database).
    assert late and sum(late) >= 0.9 * len(late), "service did not resume after the ZEO restart"
    run(interpreter, "-c", FSTEST.format(path=str(zeo.path("var", "filestorage", "Data.fs"))))


def test_zeo_server_down_at_start_stops_after_zeos_wait_with_one_line(zeo, servers):
    # No ZEO server runs.  The workers start Zope one after the other, and
    # the first waits for the server as long as ZEO does (wait-timeout, 30 s).
    # When it gives up, the master stops the others at once, though they are
    # still loading and the graceful timeout is long.
    began = time.monotonic()
    master = servers([zeo.path("bin", "gunicorn-instance"), "--workers", "3",
                      "--graceful-timeout", "60"], zeo.dir, name="no ZEO server")
    status = master.proc.wait(timeout=150)
    took = time.monotonic() - began
    # No worker outlives its master (the kernel kills them as it exits).
    eventually(lambda: not group_alive(master.pid), 5, "workers left running")
    output = master.output()
    says = (f"the ZEO server at {zeo.zeo_address} does not answer (timed out waiting for "
            "connection); start it (bin/zeoserver start), or correct the instance's zeo-address")
    assert status != 0, output
    assert logged_error(output, says), output
    assert "Traceback" not in output, output
    assert "Reason: App failed to load." in output, output
    assert 30 <= took < 50, f"stopped after {took:.0f}s"  # not 30 s and then 60 more


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_parts_side_by_side_have_their_own_files(site, zeo, servers):
    second = servers([zeo.path("bin", "gunicorn-2-instance")], zeo.dir, name="gunicorn-2")
    assert wait_until_serving(second, zeo.address2) == 200
    assert request(site.address, "/")[0] == 200
    var = zeo.path("var")
    for part, master in (("gunicorn", site.gunicorn), ("gunicorn-2", second)):
        assert int((var / f"{part}.pid").read_text()) == master.pid
        ctl = var / f"{part}.ctl"
        assert stat.S_ISSOCK(ctl.stat().st_mode)
        assert stat.S_IMODE(ctl.stat().st_mode) == 0o600
        assert "Listening at: http" in (var / "log" / f"{part}.log").read_text()
        assert f"[{master.pid}:" in (var / "log" / f"{part}.log").read_text()
    assert f"[{second.pid}:" not in (var / "log" / "gunicorn.log").read_text()


OBJECTS = """
import json
from ZODB.DB import DB
from ZODB.FileStorage import FileStorage
db = DB(FileStorage({path!r}, read_only=True))
app = db.open().root()['Application']
print(json.dumps([f"f{{k}}/{{oid}}" for k in range({folders}) for oid in app[f"f{{k}}"].objectIds()]))
db.close()
"""
FSTEST = """
from ZODB.scripts.fstest import check
check({path!r})
"""


def run(*args):
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
