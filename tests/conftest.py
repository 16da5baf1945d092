"""Real buildouts, real servers, real HTTP on loopback.

Every test buildout shares one eggs directory (the repository's ``eggs/``,
the one ``make run`` uses), so only the first build downloads anything.
Every process a test starts runs in its own session and is stopped with its
whole process group, also when the test fails.
"""

import base64
import contextlib
import http.client
import os
import random
import re
import signal
import socket
import struct
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILDOUT = Path(os.environ.get("PLONE_RECIPE_GUNICORN_BUILDOUT", REPO / ".venv" / "bin" / "buildout"))
EGGS = Path(os.environ.get("PLONE_RECIPE_GUNICORN_EGGS", REPO / "eggs"))
ADMIN = "Basic " + base64.b64encode(b"admin:admin").decode()


def _ephemeral_ports():
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


# Ports free_port may give: of 20000-29999 (the benchmark's are 18000-18199)
# those outside the kernel's ephemeral range; each is given once.
_PORTS = [port for port in range(20000, 30000) if port not in _ephemeral_ports()]
random.shuffle(_PORTS)


def free_port():
    """A loopback port nobody holds, outside the kernel's ephemeral range.

    A port the kernel hands out (bind to 0) is one it also gives to outgoing
    connections: a ZEO client's, a test's own probe, another program's on this
    shared machine can take it in the seconds between this call and the
    server's bind, and the server then rightly refuses to start.  A port
    outside that range is only taken by a program that binds it by number.
    """
    while _PORTS:
        port = _PORTS.pop()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:  # that range is all ephemeral here: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Buildout:
    """A buildout directory of a test; ``run`` is ``bin/buildout`` there
    (``script``: the buildout of another virtualenv)."""

    def __init__(self, directory, script=BUILDOUT):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.script = script

    def write(self, text):
        (self.dir / "buildout.cfg").write_text(textwrap.dedent(text).lstrip())

    def run(self, *assignments, check=True):
        result = subprocess.run(
            [str(self.script), "-N", "-c", "buildout.cfg",
             f"buildout:eggs-directory={EGGS}", f"buildout:develop={REPO}",
             *assignments],
            cwd=self.dir, capture_output=True, text=True, timeout=900,
            stdin=subprocess.DEVNULL)
        if check and result.returncode:
            pytest.fail(f"buildout failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def path(self, *parts):
        return self.dir.joinpath(*parts)


@pytest.fixture(scope="session")
def new_buildout(tmp_path_factory):
    """Make a Buildout in a fresh directory: ``new_buildout("name", cfg_text)``."""
    def make(name, text):
        buildout = Buildout(tmp_path_factory.mktemp(name))
        buildout.write(text)
        return buildout
    return make


class Server:
    """A server process of a test (zeoserver, gunicorn master), in its own session."""

    def __init__(self, args, cwd, name, env=None):
        self.name = name
        self.log_path = Path(cwd) / (re.sub(r"[^\w.-]+", "_", name) + ".console.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(a) for a in args], cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            env=None if env is None else {**os.environ, **env})

    @property
    def pid(self):
        return self.proc.pid

    def output(self):
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def running(self):
        return self.proc.poll() is None

    def signal(self, signum):
        os.kill(self.proc.pid, signum)

    def stop(self, timeout=30):
        """Stop the server and everything it started; return its exit status."""
        if self.log.closed:  # stopped before; its process group may be gone
            return self.proc.returncode
        if self.running():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        status = self.proc.wait()
        self.log.close()
        return status

    def wait_for_output(self, done, timeout):
        """Wait until ``done(output)`` is true; fail with the output if the
        server exits first or ``timeout`` seconds pass.  Returns the output."""
        deadline = time.monotonic() + timeout
        while not done(output := self.output()):
            if not self.running():
                pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: the awaited output did not appear in {timeout}s:\n"
                            f"{output[-3000:]}")
            time.sleep(0.2)
        return output

    def workers(self):
        """pids of the gunicorn workers: children of this master."""
        return children(self.pid)


def children(pid):
    """pids of the children of a process (a gunicorn master's: its workers)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except OSError:
        return []


def running(pid):
    """Whether a process runs (a zombie no longer does)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def servers():
    """Start servers for one test; all of them are stopped when it ends."""
    started = []

    def start(args, cwd, name="server", env=None):
        server = Server(args, cwd, name, env)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


def request(address, path="/", method="GET", body=None, auth=None, timeout=30):
    """One HTTP request; returns (status, body bytes).

    ``address`` is ``host:port``, ``[v6]:port`` or ``unix:/path``.
    """
    if address.startswith("unix:"):
        conn = UnixHTTPConnection(address[len("unix:"):], timeout=timeout)
    else:
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    headers = {"Connection": "close"}
    if auth:
        headers["Authorization"] = auth
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@contextlib.contextmanager
def trickling_clients(address, count, seconds=25, silent=0):
    """``count`` clients sending request headers a byte every 0.5 s, without
    end, for ``seconds`` ("slowloris"), after ``silent`` seconds of sending
    nothing.  Yields once the server has them; then the seconds after which
    the server closed each one it closed, counted from its connect.  On
    leaving, waits for all of them."""
    host, _, port = address.rpartition(":")
    closed = []

    def trickle(conn):
        began = time.monotonic()
        try:
            time.sleep(silent)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() - began < silent + seconds:
                time.sleep(0.5)
                conn.sendall(b"X")
        except OSError:  # reset by the server, which had unread bytes
            closed.append(time.monotonic() - began)
        finally:
            conn.close()

    conns = [socket.create_connection((host, int(port)), timeout=30) for _ in range(count)]
    threads = [threading.Thread(target=trickle, args=(conn,)) for conn in conns]
    try:
        for thread in threads:
            thread.start()
        time.sleep(silent + 0.5)  # the server has them
        yield closed
    finally:
        for thread in threads:
            thread.join()
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def lingering_clients(address, count):
    """``count`` clients that ask for ``Connection: close``, read their whole
    response (to the server's end of the stream), then keep their end open,
    as a far client does for a round trip; closed on leaving."""
    host, _, port = address.rpartition(":")
    conns = []
    try:
        for _ in range(count):
            conns.append(conn := socket.create_connection((host, int(port)), timeout=30))
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
            assert response.startswith(b"HTTP/1.1 200") and response.rstrip().endswith(b"</html>")
        yield
    finally:
        for conn in conns:
            conn.close()


# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments with data received.
TCPI_DATA_SEGS_IN = 152


def read_response(reader, method="GET"):
    """One whole response from ``reader`` (a kept-alive connection's
    ``makefile("rb")``): its status line, header fields and body (by
    Content-Length; none for HEAD)."""
    status = reader.readline().decode("latin-1").rstrip("\r\n")
    assert status, "connection closed"
    fields = {}
    while (line := reader.readline().decode("latin-1").rstrip("\r\n")):
        name, _, value = line.partition(":")
        fields[name.lower()] = value.strip()
    length = int(fields.get("content-length", 0)) if method != "HEAD" else 0
    return status, fields, reader.read(length)


def data_segments_in(conn):
    """The TCP segments with data that ``conn`` has received (Linux)."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, TCPI_DATA_SEGS_IN)[0]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def run_script(buildout, *args, script="gunicorn-instance", prefix=(), timeout=60):
    """Run a script of the buildout (``bin/gunicorn-instance check``, say) to
    its end; return (exit status, output)."""
    result = subprocess.run([*prefix, str(buildout.path("bin", script)), *args],
                            cwd=buildout.dir, capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout + result.stderr


def eventually(condition, timeout, why="", interval=0.1):
    """Wait until ``condition()`` is true and return it; after ``timeout``
    seconds fail, saying ``why`` (a text, or a function giving one)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            pytest.fail(f"not within {timeout}s: {why() if callable(why) else why}")
        time.sleep(interval)
    return value


def datagrams_until(listener, awaited, timeout=10):
    """What a statsd or syslog ``listener`` (a datagram socket) receives
    until ``awaited`` is among it, one datagram a line; a timeout fails."""
    listener.settimeout(timeout)
    received = b""
    while awaited not in received:
        received += listener.recv(65536) + b"\n"
    return received


def logged_error(output, says):
    """Whether the server's log lines (in its output too) say ``says`` as an error."""
    return any(" ERROR " in line and line.endswith(f"] {says}") for line in output.splitlines())


def wait_until_serving(server, address, path="/", timeout=90):
    """Wait for the first answer from ``address``; fail with the server's output if none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.running():
            pytest.fail(f"{server.name} exited with {server.proc.returncode}:\n{server.output()}")
        try:
            status, _ = request(address, path, timeout=5)
            return status
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{server.name} did not answer on {address} in {timeout}s:\n{server.output()}")


def wait_for_port(address, timeout=60):
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"nothing listens on {address} after {timeout}s")


_FIGURES = []


@pytest.fixture
def figures(request):
    """Record a line of measured figures; all are printed at the end of the run."""
    def record(line):
        _FIGURES.append(f"{request.node.name}: {line}")
    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures measured by the tests")
        for line in _FIGURES:
            terminalreporter.write_line(line)
