"""bin/<part>-instance at start: misconfigurations exit non-zero with one clear line."""

import fcntl
import os
import pwd
import signal
import socket
import threading
import time

import pytest

from conftest import (REPO, datagrams_until, eventually, free_port, logged_error, request,
                      run_script, wait_for_port, wait_until_serving)


@pytest.fixture(scope="module")
def fs(new_buildout):
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("runtime", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = {address}
    """)
    buildout.run()
    buildout.address = address
    return buildout


def start_refused(buildout, *args, script="gunicorn-instance"):
    """Run the script expecting a refusal; return its one output line."""
    status, output = run_script(buildout, *args, script=script)
    assert status != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--workers", "2"], "2 workers on a FileStorage: one process must own a FileStorage"),
    (["--preload"], "set preload_app = false"),
])
def test_unsafe_command_line_is_refused_before_serving(fs, args, says):
    line = start_refused(fs, *args)
    assert line.startswith("gunicorn-instance: ") and says in line


def test_port_in_use_is_one_line(fs):
    host, port = fs.address.split(":")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((host, int(port)))
        squatter.listen()
        line = start_refused(fs)
    assert line == (f"gunicorn-instance: {fs.address} is in use by another program; "
                    "stop it or change http-address or bind")


@pytest.mark.parametrize("address, stale, reason", [
    ("unix://{var}/no-syslog.sock", False, "No such file or directory"),
    ("unix://{var}/no-syslog.sock#dgram", True, "Connection refused"),  # a daemon gone
    ("tcp://127.0.0.1:{port}", False, "Connection refused"),
])
def test_syslog_nobody_listens_to_is_one_line(fs, address, stale, reason):
    # the server would drop every syslog message, saying so on a stderr that
    # start has closed (unix), or gunicorn stop without naming syslog (tcp)
    address = address.format(var=fs.path("var"), port=free_port())
    socket_file = fs.path("var", "no-syslog.sock")
    socket_file.unlink(missing_ok=True)
    if stale:  # the socket file of a syslog daemon that has stopped
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
            daemon.bind(str(socket_file))
    line = start_refused(fs, "--log-syslog", "--log-syslog-to", address)
    assert line == (f"gunicorn-instance: syslog-addr {address}: no syslog daemon listens "
                    f"there ({reason}); start one, give syslog-addr its address, or set "
                    "syslog = false")


def test_syslog_address_gunicorn_cannot_read_is_one_line(fs):
    line = start_refused(fs, "--log-syslog", "--log-syslog-to", "udp://localhost:x")
    says = "syslog-addr udp://localhost:x: 'x' is not a valid port number; gunicorn reads unix://PATH"
    assert line.startswith("gunicorn-instance: ") and says in line


def test_a_database_open_in_another_process_is_one_line(fs):
    # bin/instance fg, or another part, has the FileStorage open: it holds the
    # lock on Data.fs.lock (here this test does, as ZODB does it).
    lock = fs.path("var", "filestorage", "Data.fs.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    says = (f"Couldn't lock '{lock}': another process holds it (bin/instance, "
            "or another gunicorn part); stop it first")
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert start_refused(fs, "check") == f"gunicorn-instance: the application does not load: {says}"
        began = time.monotonic()
        status, output = run_script(fs, timeout=120)
    assert status != 0, output
    assert logged_error(output, says), output  # gunicorn's own lines around it
    assert "Traceback" not in output, output
    assert "Reason: App failed to load." in output, output
    assert time.monotonic() - began < 60


# root may write anywhere; without these capabilities it meets the mode bits
# as any other user does (setpriv, from util-linux, is on every Debian).
AS_ANY_USER = (["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
               if os.geteuid() == 0 else [])


def test_a_database_directory_the_server_may_not_write_is_one_line(fs):
    # Buildout ran as one user (root), the server runs as another (systemd-user,
    # gunicorn's user): Zope cannot create its lock file in var/filestorage.
    directory = fs.path("var", "filestorage")
    directory.mkdir(parents=True, exist_ok=True)
    user = pwd.getpwuid(os.geteuid()).pw_name
    says = (f"[Errno 13] Permission denied: '{directory / 'Data.fs.lock'}': the server "
            f"runs as user {user}, who may not write there; give that user the directory "
            "and its files (chown -R), or start the server as its owner")
    directory.chmod(0)
    try:
        status, output = run_script(fs, "check", prefix=AS_ANY_USER, timeout=120)
        assert status != 0
        assert output.splitlines() == [f"gunicorn-instance: the application does not load: {says}"]
        status, output = run_script(fs, prefix=AS_ANY_USER, timeout=120)
    finally:
        directory.chmod(0o755)
    assert status != 0, output
    assert logged_error(output, says), output  # gunicorn's own lines around it
    assert "Traceback" not in output, output
    assert "Reason: App failed to load." in output, output


def test_a_database_directory_gone_is_one_line(fs):
    directory = fs.path("var", "filestorage")
    directory.mkdir(parents=True, exist_ok=True)
    away = directory.rename(directory.with_name("filestorage.away"))
    try:
        line = start_refused(fs, "check")
    finally:
        away.rename(directory)
    assert line.startswith(
        "gunicorn-instance: the application does not load: The directory named as part "
        f"of the path {directory / 'Data.fs'} does not exist. (line "), line
    assert line.endswith("zope.conf)"), line


@pytest.mark.parametrize("worker, threads", [("SyncWorker", "1"), ("ThreadWorker", "4")])
def test_no_worker_timeout_still_waits_for_a_request(fs, servers, worker, threads):
    # gunicorn's timeout = 0: no heartbeat, so no limit on a worker's waits
    server = servers([fs.path("bin", "gunicorn-instance"), "--timeout", "0",
                      "-k", f"plone.recipe.gunicorn.worker.{worker}", "--threads", threads],
                     fs.dir, name=f"timeout 0, {worker}")
    assert wait_until_serving(server, fs.address) == 200
    host, port = fs.address.split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        time.sleep(0.5)  # a client that takes its time: first bytes later,
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(1)  # the header section's end later still
        conn.sendall(b"Connection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 OK"), response[:200]
    assert server.stop() == 0


def test_live_pidfile_refuses_and_stale_one_does_not_block(fs, servers):
    first = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="first")
    assert wait_until_serving(first, fs.address) == 200
    line = start_refused(fs)
    assert line == (f"gunicorn-instance: already running as PID {first.pid} "
                    f"(pidfile {fs.path('var', 'gunicorn.pid')}); stop it first")

    # A crash: the master and its worker die without removing the pidfile
    # (all at once: a master killed first would leave no one to respawn).
    os.killpg(first.pid, signal.SIGKILL)
    first.proc.wait()
    assert fs.path("var", "gunicorn.pid").read_text().strip() == str(first.pid)
    second = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="second")
    assert wait_until_serving(second, fs.address) == 200
    assert int(fs.path("var", "gunicorn.pid").read_text()) == second.pid


def test_statsd_host_gets_gunicorns_metrics(fs, servers):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as statsd:
        statsd.bind(("127.0.0.1", 0))
        port = statsd.getsockname()[1]
        server = servers([fs.path("bin", "gunicorn-instance"), "--statsd-host",
                          f"127.0.0.1:{port}"], fs.dir, name="statsd")
        assert wait_until_serving(server, fs.address) == 200
        packets = datagrams_until(statsd, b"gunicorn.request.status.200:1|c")
    assert b"gunicorn.requests:1|c" in packets
    assert server.stop() == 0


class TcpSyslogDaemon:
    """A syslog daemon on a TCP port of loopback, which can stop and start
    again on the same port, as rsyslog does when logrotate restarts it."""

    def __init__(self):
        self.chunks = []  # from every connection, in the order they came
        self.port = free_port()  # not an ephemeral one, which an outgoing connection could take
        self.start()

    @property
    def received(self):
        return b"".join(self.chunks)

    def start(self):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen()
        self.connections = []
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # stopped
                return
            self.connections.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn):
        try:
            while data := conn.recv(65536):
                self.chunks.append(data)
        except OSError:
            pass

    def stop(self):
        for sock in [self.listener] + self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # never connected, or gone already
                pass
            sock.close()


def test_a_syslog_daemon_that_restarts_gets_the_log_again(fs, servers):
    # Python's SysLogHandler printed a traceback for every message once the
    # daemon had gone, and over TCP never connected again.
    daemon = TcpSyslogDaemon()
    try:
        server = servers([fs.path("bin", "gunicorn-instance"), "--log-syslog",
                          "--log-syslog-to", f"tcp://127.0.0.1:{daemon.port}"],
                         fs.dir, name="syslog-restart")
        assert wait_until_serving(server, fs.address, "/?before") == 200
        eventually(lambda: b"GET /?before " in daemon.received, 10, "no access line in syslog")
        daemon.stop()
        for n in range(5):  # served while the daemon is away
            assert request(fs.address, f"/?away-{n}")[0] == 200
        daemon.start()
        eventually(lambda: request(fs.address, "/?back")[0] == 200
                   and b"GET /?back " in daemon.received, 20,
                   lambda: f"syslog gets nothing again:\n{server.output()[-3000:]}")
        output = server.output()
        assert "Logging error" not in output and "Traceback" not in output, output
        [worker] = server.workers()
        says = f"plone.recipe.gunicorn: syslog at 127.0.0.1:{daemon.port}: process {worker} "
        assert output.count(says + "cannot send to it (") == 1, output
        assert output.count(says + "sends to it again") == 1, output
        assert server.stop() == 0
    finally:
        daemon.stop()


def slow_post(address, seconds, answers):
    """A POST to / whose body takes ``seconds`` to arrive; the answer's status line into ``answers``."""
    host, port = address.split(":")
    body = b"x=" + b"1" * 18
    with socket.create_connection((host, int(port)), timeout=60) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Type: application/x-www-form-urlencoded\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for byte in body:
            time.sleep(seconds / len(body))
            conn.sendall(bytes([byte]))
        answers.append(conn.makefile("rb").readline())


def hup_during_a_slow_post(server, address):
    """HUP the server while its worker reads a 4 s POST; the POST's status lines."""
    answers = []
    client = threading.Thread(target=slow_post, args=(address, 4, answers))
    client.start()
    time.sleep(1)  # the worker is reading the body
    server.signal(signal.SIGHUP)
    client.join()
    return answers


def test_hup_on_a_filestorage_finishes_the_request_then_replaces_the_worker(fs, servers):
    server = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="hup")
    assert wait_until_serving(server, fs.address) == 200
    [old] = server.workers()
    answers = hup_during_a_slow_post(server, fs.address)
    # The old worker finished the request; only then did the new one open
    # the database, which the old one held until it exited.
    assert answers == [b"HTTP/1.1 200 OK\r\n"]
    assert wait_until_serving(server, fs.address) == 200
    [new] = server.workers()
    assert new != old
    assert "LockError" not in server.output()
    assert server.stop() == 0


def test_more_workers_on_a_filestorage_are_refused_while_running(fs, servers):
    ini = fs.path("parts", "gunicorn", "gunicorn.ini")
    good = ini.read_text()
    server = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="more workers")
    assert wait_until_serving(server, fs.address) == 200
    try:
        server.signal(signal.SIGTTIN)  # one worker more, please
        server.wait_for_output(lambda out: "keeping 1" in out, timeout=10)
        ini.write_text(good.replace("workers = 1", "workers = 2"))
        server.signal(signal.SIGHUP)  # the configuration now asks for 2
        server.wait_for_output(lambda out: "Configuration not applied" in out, timeout=30)
    finally:
        ini.write_text(good)
    assert wait_until_serving(server, fs.address) == 200
    time.sleep(2)  # time for a second worker, if there were one
    assert len(server.workers()) == 1
    assert "LockError" not in server.output()
    assert server.stop() == 0


def test_usr2_on_a_filestorage_is_refused_and_the_server_serves_on(fs, servers):
    # A new master's worker could not open the FileStorage the old one holds.
    server = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="usr2")
    assert wait_until_serving(server, fs.address) == 200
    [worker] = server.workers()
    server.signal(signal.SIGUSR2)
    server.wait_for_output(lambda out: "USR2 ignored" in out, timeout=10)
    assert server.workers() == [worker]  # no new master among the children
    assert wait_until_serving(server, fs.address) == 200
    assert server.stop() == 0


@pytest.fixture(scope="module")
def zeo_cache(new_buildout):
    """A ZEO client instance with a persistent cache (zeo-client-client),
    served by an ini part (the defaults) and a script part (1 worker set)."""
    address, script_address, zeo = (f"127.0.0.1:{free_port()}" for _ in range(3))
    buildout = new_buildout("zeocache", f"""
        [buildout]
        extends = {REPO}/gunicorn.cfg
        parts = zeoserver instance gunicorn-ini gunicorn-script
        [zeoserver]
        zeo-address = {zeo}
        [instance]
        http-address = {address}
        zeo-client-client = zeo1
        [gunicorn-ini]
        recipe = plone.recipe.gunicorn
        [gunicorn-script]
        recipe = plone.recipe.gunicorn
        mode = script
        bind = {script_address}
        workers = 1
    """)
    buildout.output = buildout.run().stdout
    buildout.addresses = {"gunicorn-ini": address, "gunicorn-script": script_address}
    buildout.zeo = zeo
    return buildout


def test_persistent_zeo_cache_gets_one_worker_with_the_instances_threads(zeo_cache):
    """Several workers could not all open the cache file: by default the part
    gets the FileStorage's shape, and buildout says why."""
    import configparser
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(zeo_cache.path("parts", "gunicorn-ini", "gunicorn.ini"))
    server = ini["server:main"]
    assert (server["workers"], server["threads"], server["worker_class"]) == (
        "1", "4", "plone.recipe.gunicorn.worker.ThreadWorker")
    assert ("gunicorn-ini: one worker with 4 threads: part [instance] sets zeo-client-client "
            "= zeo1, a ZEO cache file that one process may open; without it the default "
            f"is {os.cpu_count() + 1} workers") in zeo_cache.output


@pytest.mark.parametrize("part", ["gunicorn-ini", "gunicorn-script"])
def test_more_workers_on_a_persistent_zeo_cache_are_refused(zeo_cache, part):
    line = start_refused(zeo_cache, "-w", "2", script=f"{part}-instance")
    if part == "gunicorn-ini":  # for bin/instance running the ini, which passes it on
        assert "\nzeo_client_client = zeo1\n" in zeo_cache.path(
            "parts", "gunicorn-ini", "gunicorn.ini").read_text()
    assert line == (f"{part}-instance: 2 workers with zeo-client-client = zeo1: one process "
                    "may open that ZEO cache file, so every worker but the first would fail "
                    "to start; use 1 worker, or remove zeo-client-client from the instance, "
                    "so that each worker keeps its cache in memory")


@pytest.mark.parametrize("part", ["gunicorn-ini", "gunicorn-script"])
def test_persistent_zeo_cache_keeps_one_worker_and_survives_hup(zeo_cache, servers, part):
    """The cache file is where bin/instance keeps it ($(ZEO_TMP), the
    temporary directory), and only one process at a time opens it: TTIN
    adds no worker and HUP stops the old one first.  A second worker would
    die of a LockError, and gunicorn would then stop the whole server."""
    address = zeo_cache.addresses[part]
    tmp = zeo_cache.path(f"tmp-{part}")
    tmp.mkdir(exist_ok=True)
    servers([zeo_cache.path("bin", "zeoserver"), "fg"], zeo_cache.dir, name=f"zeo {part}")
    wait_for_port(zeo_cache.zeo)
    server = servers([zeo_cache.path("bin", f"{part}-instance")], zeo_cache.dir,
                     name=f"cache {part}", env={"TMPDIR": str(tmp)})
    assert wait_until_serving(server, address) == 200
    assert (tmp / "zeo1-1.zec").exists()
    [old] = server.workers()

    server.signal(signal.SIGTTIN)  # one worker more, please
    server.wait_for_output(lambda out: "keeping 1" in out, timeout=10)

    answers = hup_during_a_slow_post(server, address)
    assert answers == [b"HTTP/1.1 200 OK\r\n"]
    assert wait_until_serving(server, address) == 200
    [new] = server.workers()
    assert new != old
    assert "LockError" not in server.output()
    assert server.stop() == 0
