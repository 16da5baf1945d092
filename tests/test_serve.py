"""End to end: the repository's own buildouts, a real Zope, ZEO server and gunicorn."""

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import textwrap
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import (ADMIN, REPO, data_segments_in, eventually, free_port, read_response,
                      lingering_clients, request, trickling_clients, wait_for_port,
                      wait_until_serving)


@pytest.fixture(scope="module")
def filestorage(new_buildout):
    """buildout.cfg as users extend it, plus a second part in script mode."""
    http, script_port = free_port(), free_port()
    buildout = new_buildout("filestorage", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        parts += gunicorn-script

        [instance]
        http-address = 127.0.0.1:{http}

        [gunicorn-script]
        recipe = plone.recipe.gunicorn
        mode = script
        bind = 127.0.0.1:{script_port}
    """)
    buildout.run()
    buildout.addresses = {"gunicorn": f"127.0.0.1:{http}",
                          "gunicorn-script": f"127.0.0.1:{script_port}"}
    return buildout


@pytest.mark.parametrize("part", ["gunicorn", "gunicorn-script"])
def test_filestorage_instance_served_by_one_worker(filestorage, servers, part):
    address = filestorage.addresses[part]
    server = servers([filestorage.path("bin", f"{part}-instance")], filestorage.dir, name=part)
    assert wait_until_serving(server, address) == 200

    status, body = request(address, "/")
    assert status == 200 and b"Zope" in body
    assert request(address, "/manage_main")[0] == 401
    status, body = request(address, "/manage_main", auth=ADMIN)
    assert status == 200 and b"Control_Panel" in body
    assert len(server.workers()) == 1  # a FileStorage belongs to one process
    # More silent connections (a browser's preconnects) than the worker has
    # threads: gunicorn's gthread worker gives each a thread for 5 s first.
    host, port = address.split(":")
    silent = [socket.create_connection((host, int(port))) for _ in range(5)]
    try:
        began = time.monotonic()
        assert request(address, "/")[0] == 200
        assert time.monotonic() - began < 2
    finally:
        for conn in silent:
            conn.close()
    assert server.stop() == 0
    # Every request is in the part's access log once, with its status, as
    # bin/instance logs them (the translogger in ini mode, gunicorn in script mode).
    access = filestorage.path("var", "log", f"{part}-access.log").read_text()
    assert access.count('"GET /manage_main HTTP/1.1" 401') == 1
    assert access.count('"GET /manage_main HTTP/1.1" 200') == 1


@pytest.mark.parametrize("silent", [0, 4.5], ids=["at-once", "after-silence"])
def test_trickling_clients_hold_a_thread_for_seconds_only(filestorage, servers, figures, silent):
    """As many clients trickling their request headers in as the FileStorage
    worker has threads: gunicorn's gthread worker gives each a thread for as
    long as it keeps sending; the recipe's closes them 10 s after their
    first bytes.  "after-silence": they send nothing for 4.5 s first, so
    the kernel hands them over silent (after 3 s, TCP_DEFER_ACCEPT) and
    their first bytes come while a thread waits for them."""
    address = filestorage.addresses["gunicorn"]
    server = servers([filestorage.path("bin", "gunicorn-instance")], filestorage.dir,
                     name="gunicorn")
    assert wait_until_serving(server, address) == 200
    with trickling_clients(address, 4, silent=silent) as closed:  # the instance's 4 threads
        began = time.monotonic()
        status, _ = request(address, timeout=60)
        answered = time.monotonic() - began
    figures(f"4 clients trickling their headers to 1 worker x 4 threads after {silent}s of "
            f"silence: a request answered {status} after {answered:.1f}s; the server closed "
            f"them after {', '.join(f'{t:.1f}' for t in sorted(closed))}s")
    assert status == 200
    assert answered < 18  # about 10 s; gunicorn's: when they stop, 25 s after their first bytes
    assert len(closed) == 4 and max(closed) < silent + 15
    assert server.stop() == 0


def https_status(address, context, path="/"):
    """The status of one HTTPS request, or None while nothing answers."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), context=context, timeout=30)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status
    except ConnectionRefusedError:
        return None
    finally:
        conn.close()


@pytest.mark.parametrize("worker", ["ThreadWorker", "SyncWorker"])
def test_tls_is_served_by_the_recipes_workers(filestorage, servers, tmp_path, worker):
    # Both workers look at a request's first bytes before gunicorn reads them,
    # to wait for its headers; over TLS these bytes are encrypted records.
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    address = f"127.0.0.1:{free_port()}"
    server = servers([filestorage.path("bin", "gunicorn-instance"), "--bind", address,
                      "--certfile", cert, "--keyfile", key, "-k",
                      f"plone.recipe.gunicorn.worker.{worker}",
                      "--threads", 1 if worker == "SyncWorker" else 4],
                     filestorage.dir, name=f"tls {worker}")
    context = ssl.create_default_context(cafile=cert)
    assert eventually(lambda: https_status(address, context), 90, server.output) == 200
    assert f"plone.recipe.gunicorn.worker.{worker}" in server.output()
    began = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda _: https_status(address, context), range(40)))
    assert statuses == [200] * 40
    assert time.monotonic() - began < 10  # no request waited for headers it could not see
    assert server.stop() == 0


def test_client_slow_to_close_stalls_no_thread(filestorage, servers, figures):
    """A client that asked for ``Connection: close`` has its whole response
    but closes its end late (a far client's FIN comes a round trip later).
    gunicorn's gthread worker waits for it, up to 2 s, on the thread that
    serves every connection, so the whole FileStorage worker stands still."""
    address = filestorage.addresses["gunicorn"]
    server = servers([filestorage.path("bin", "gunicorn-instance")], filestorage.dir,
                     name="gunicorn")
    assert wait_until_serving(server, address) == 200
    with lingering_clients(address, 1):
        began = time.monotonic()
        status, _ = request(address)
        answered = time.monotonic() - began
    figures(f"a client holding its connection open after its response: the next request "
            f"answered {status} after {answered:.3f}s (gunicorn's gthread worker: up to 2s)")
    assert status == 200
    assert answered < 1
    assert server.stop() == 0


def test_thread_worker_sends_head_and_body_together(filestorage, servers, figures):
    """As the sync worker (tests/test_faults.py), the recipe's gthread worker
    sends a response's head and body in one write, on a kept-alive
    connection too, and the head of a ``HEAD`` response when the request is
    done, not when the connection ends."""
    address = filestorage.addresses["gunicorn"]
    server = servers([filestorage.path("bin", "gunicorn-instance")], filestorage.dir,
                     name="gunicorn")
    assert wait_until_serving(server, address) == 200
    host, _, port = address.rpartition(":")
    methods = ["GET", "GET", "HEAD", "GET"]
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        reader = conn.makefile("rb")
        for method in methods:
            conn.sendall(f"{method} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, _, body = read_response(reader, method)
            assert status == "HTTP/1.1 200 OK"
            assert (body == b"") if method == "HEAD" else body.rstrip().endswith(b"</html>")
        segments = data_segments_in(conn)
    figures(f"{' '.join(methods)} on one kept-alive connection to the FileStorage worker: "
            f"{segments} TCP segments with data")
    assert segments == len(methods)
    assert server.stop() == 0


def cpu_ticks(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def load(address, paths, method="GET", body=None, auth=None, concurrency=20):
    """Send one request per path, ``concurrency`` at a time; return the statuses."""
    def one(path):
        try:
            return request(address, path, method=method, auth=auth,
                           body=body(path) if body else None)[0]
        except OSError as exc:
            return type(exc).__name__
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, paths))


def reads_and_writes_through_every_worker(gunicorn, address, workers, label):
    """200 reads, then 200 writes, at 20 concurrent connections: all answered
    200, every worker serving, none dying.  Returns the ids of the folders
    written, each titled ``title of <id>``."""
    before = {pid: cpu_ticks(pid) for pid in workers}
    statuses = load(address, ["/"] * 200)
    used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
    print(f"\n{label}: 200 reads at 20 concurrent: {statuses.count(200)} answered 200; "
          f"worker CPU ticks {used}")
    assert statuses == [200] * 200
    assert all(ticks > 0 for ticks in used.values()), used

    # Each write to its own object.  The objects are added one by one first:
    # concurrent additions to one plain folder conflict by ZODB design,
    # whatever the server.
    ids = [f"f{i}" for i in range(200)]
    for oid in ids:
        status, _ = request(address, "/manage_addProduct/OFSP/manage_addFolder", "POST",
                            urllib.parse.urlencode({"id": oid}), auth=ADMIN)
        assert status in (200, 302), (oid, status)
    before = {pid: cpu_ticks(pid) for pid in workers}
    statuses = load(address, [f"/{oid}/manage_changeProperties" for oid in ids], "POST",
                    body=lambda path: urllib.parse.urlencode({"title": "title of " + path.split("/")[1]}),
                    auth=ADMIN)
    used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
    print(f"{label}: 200 writes at 20 concurrent: {statuses.count(200)} answered 200; "
          f"worker CPU ticks {used}")
    assert statuses == [200] * 200
    assert all(ticks > 0 for ticks in used.values()), used
    assert set(gunicorn.workers()) == set(workers)  # no worker died on the way
    return ids


@pytest.mark.parametrize("config, mode", [("gunicorn.cfg", "ini"), ("gunicorn-alt.cfg", "script")])
def test_zeo_two_workers_from_an_empty_database(new_buildout, servers, config, mode):
    http, zeo = free_port(), free_port()
    buildout = new_buildout(mode, f"""
        [buildout]
        extends = {REPO}/{config}

        [zeoserver]
        zeo-address = 127.0.0.1:{zeo}

        [instance]
        http-address = 127.0.0.1:{http}
    """)
    buildout.run()
    address = f"127.0.0.1:{http}"
    data_fs = buildout.path("var", "filestorage", "Data.fs")
    assert not data_fs.exists()

    zeoserver = servers([buildout.path("bin", "zeoserver"), "fg"], buildout.dir, name="zeoserver")
    wait_for_port(f"127.0.0.1:{zeo}")
    gunicorn = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="gunicorn")
    assert wait_until_serving(gunicorn, address) == 200

    # Both workers boot on the fresh database: neither dies creating the Zope root.
    gunicorn.wait_for_output(lambda out: out.count("Ready to handle requests") >= 2, 30)
    workers = gunicorn.workers()
    assert len(workers) == 2, gunicorn.output()
    assert "Worker failed to boot" not in gunicorn.output()
    assert "ConflictError" not in gunicorn.output()

    ids = reads_and_writes_through_every_worker(gunicorn, address, workers, config)

    assert gunicorn.stop() == 0
    assert zeoserver.stop() in (0, -15)

    # Every write is in the database, and the database is sound.
    interpreter = buildout.path("parts", "instance", "bin", "interpreter")
    titles = json.loads(run(interpreter, "-c", TITLES.format(path=str(data_fs))))
    assert titles == {oid: f"title of {oid}" for oid in ids}
    assert run(interpreter, "-c", FSTEST.format(path=str(data_fs))).strip() == "fstest: ok"


# Run with the instance's interpreter, which has ZODB and Zope on its path.
TITLES = """
import json
from ZODB.DB import DB
from ZODB.FileStorage import FileStorage
db = DB(FileStorage({path!r}, read_only=True))
app = db.open().root()['Application']
print(json.dumps({{oid: app[oid].title for oid in app.objectIds() if oid.startswith('f')}}))
db.close()
"""
FSTEST = """
from ZODB.scripts.fstest import check
check({path!r})  # raises FormatError on the first inconsistency
print("fstest: ok")
"""


def run(*args):
    import subprocess
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_relstorage_gets_a_worker_per_core_and_one_more(new_buildout, servers):
    # RelStorage is a shared database as ZEO is.  On SQLite, the one
    # RelStorage database that needs no server here, its processes share one
    # file on one host.
    http = free_port()
    buildout = new_buildout("relstorage", f"""
        [buildout]
        extends = {REPO}/buildout.cfg

        [instance]
        http-address = 127.0.0.1:{http}
        eggs =
            Zope
            RelStorage
        rel-storage =
            type sqlite3
            data-dir ${{buildout:directory}}/var/relstorage
    """)
    buildout.run()
    address = f"127.0.0.1:{http}"
    gunicorn = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="gunicorn")
    assert wait_until_serving(gunicorn, address) == 200
    expected = os.cpu_count() + 1  # the default on a shared database
    gunicorn.wait_for_output(lambda out: out.count("Ready to handle requests") >= expected, 30)
    workers = gunicorn.workers()
    assert len(workers) == expected, gunicorn.output()
    assert "Using worker: plone.recipe.gunicorn.worker.SyncWorker" in gunicorn.output()

    ids = reads_and_writes_through_every_worker(gunicorn, address, workers, "RelStorage")
    assert gunicorn.stop() == 0

    interpreter = buildout.path("parts", "instance", "bin", "interpreter")
    data_dir = buildout.path("var", "relstorage")
    titles = json.loads(run(interpreter, "-c", RELSTORAGE_TITLES.format(data_dir=str(data_dir))))
    assert titles == {oid: f"title of {oid}" for oid in ids}


RELSTORAGE_TITLES = """
import json
import ZODB.config
db = ZODB.config.databaseFromString('''
%import relstorage
<zodb>
  <relstorage>
    read-only true
    <sqlite3>
      data-dir {data_dir}
    </sqlite3>
  </relstorage>
</zodb>
''')
app = db.open().root()['Application']
print(json.dumps({{oid: app[oid].title for oid in app.objectIds() if oid.startswith('f')}}))
db.close()
"""


def instance_running_the_ini(new_buildout, name, extends, more=""):
    """A built buildout whose instance part runs the gunicorn part's ini
    (``wsgi = ...``); returns it and the address it serves on."""
    http = free_port()
    buildout = new_buildout(name, textwrap.dedent(f"""
        [buildout]
        extends = {REPO}/{extends}

        [instance]
        http-address = 127.0.0.1:{http}
        eggs =
            Zope
            plone.recipe.gunicorn
        wsgi = ${{buildout:parts-directory}}/gunicorn/gunicorn.ini
    """) + "\n" + more)
    buildout.run()
    return buildout, f"127.0.0.1:{http}"


def test_bin_instance_pointed_at_the_ini_serves_from_fresh_workers(new_buildout, servers):
    """``wsgi = <the gunicorn ini>`` in the instance part: ``bin/instance console``
    loads Zope once in its own process, so that process gives way to a fresh
    gunicorn master whose two workers each open their own ZEO connection."""
    zeo = free_port()
    buildout, address = instance_running_the_ini(
        new_buildout, "route", "gunicorn.cfg", f"[zeoserver]\nzeo-address = 127.0.0.1:{zeo}")
    servers([buildout.path("bin", "zeoserver"), "fg"], buildout.dir, name="zeoserver")
    wait_for_port(f"127.0.0.1:{zeo}")
    instance = servers([buildout.path("bin", "instance"), "console"], buildout.dir, name="instance")
    assert wait_until_serving(instance, address) == 200
    statuses = load(address, ["/"] * 200)
    assert statuses == [200] * 200
    # Each worker opens its own ZEO connection.  The first worker up may have
    # served all of the above while the second still starts: wait for both.
    # (runwsgi's own connection is logged by its networking thread, which may
    # lose the race with the exec: not asserted.)
    def both_workers_connected(output):
        booted = set(re.findall(r"Booting worker with pid: (\d+)", output))
        connected = set(re.findall(r"\[(\d+):[^]]*\] \S+ Connected to storage", output))
        return len(booted) == 2 and booted <= connected

    instance.wait_for_output(both_workers_connected, 60)


def test_header_check_counts_what_was_read_before():
    # A pipelined POST: gunicorn has read its headers and the start of its
    # body with the request before; the socket holds only the rest.
    from plone.recipe.gunicorn.worker import header_arrived

    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as client:
            server, _ = listener.accept()
            with server:
                client.sendall(b"cd")
                time.sleep(0.1)
                began = time.monotonic()
                assert header_arrived(server, 3, already=b"POST / HTTP/1.1\r\nHost: x\r\n"
                                                         b"Content-Length: 4\r\n\r\nab")
                assert time.monotonic() - began < 1
                # and a header section still coming is still waited for
                assert not header_arrived(server, 1, already=b"GET / HTTP/1.1\r\n")


def test_bin_instance_pointed_at_the_ini_keeps_one_worker_on_a_filestorage(new_buildout, servers):
    """The same route on a FileStorage: the ini tells the fresh master that
    the database belongs to one process, so it refuses a second worker."""
    # PasteDeploy reads the ini with interpolation: the %s of a format are escaped.
    buildout, address = instance_running_the_ini(
        new_buildout, "fsroute", "buildout.cfg", "[gunicorn]\naccess-log-format = %(s)s %(r)s\n")
    instance = servers([buildout.path("bin", "instance"), "console"], buildout.dir, name="instance")
    assert wait_until_serving(instance, address) == 200
    access_log = buildout.path("var", "log", "gunicorn-access.log")
    eventually(lambda: "200 GET / HTTP/1.1\n" in access_log.read_text(), 10, access_log.read_text)
    instance.signal(signal.SIGTTIN)  # the master: runwsgi's process, replaced by exec
    instance.wait_for_output(lambda out: "keeping 1" in out, timeout=15)
    assert wait_until_serving(instance, address) == 200
    assert "LockError" not in instance.output()


def test_bin_instance_pointed_at_the_ini_keeps_one_worker_on_a_persistent_zeo_cache(
        new_buildout, servers):
    """The same route with zeo-client-client: the ini passes it on to the fresh
    master, which refuses a second worker on the cache file."""
    zeo = free_port()
    buildout, address = instance_running_the_ini(
        new_buildout, "cacheroute", "gunicorn.cfg",
        f"[zeoserver]\nzeo-address = 127.0.0.1:{zeo}\n"
        "[instance]\nzeo-client-client = zeo1\nzeo-var = ${buildout:directory}/var\n"
        "[gunicorn]\nworkers = 1\n")
    servers([buildout.path("bin", "zeoserver"), "fg"], buildout.dir, name="zeoserver")
    wait_for_port(f"127.0.0.1:{zeo}")
    instance = servers([buildout.path("bin", "instance"), "console"], buildout.dir, name="instance")
    assert wait_until_serving(instance, address) == 200
    assert buildout.path("var", "zeo1-1.zec").exists()
    instance.signal(signal.SIGTTIN)
    instance.wait_for_output(lambda out: "keeping 1" in out, timeout=15)
    assert wait_until_serving(instance, address) == 200
    assert "LockError" not in instance.output()


@pytest.mark.parametrize("mode", ["ini", "script"])
def test_bodies_over_the_instances_max_request_body_size_are_refused(new_buildout, servers, mode):
    """As waitress refuses them under bin/instance: 413, and the body over the
    limit is neither read nor stored (a Content-Length over it is answered
    before a byte of the body is sent)."""
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout(f"maxbody-{mode}", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = {address}
        max-request-body-size = 100000
        [gunicorn]
        mode = {mode}
    """)
    buildout.run()
    server = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name=mode)
    assert wait_until_serving(server, address) == 200
    host, port = address.split(":")

    def post(headers, body=b""):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/x-www-form-urlencoded\r\n"
                         + headers + b"\r\n" + body)
            return conn.makefile("rb").readline()

    form = b"x=" + b"1" * 99_998  # exactly the limit
    assert post(b"Content-Length: %d\r\n" % len(form), form) == b"HTTP/1.1 200 OK\r\n"
    # 2 GB announced, nothing sent: answered at once
    assert post(b"Content-Length: 2000000000\r\n") == b"HTTP/1.1 413 Request Entity Too Large\r\n"
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece)
                       for piece in [b"x=", *[b"1" * 10_000] * 11]) + b"0\r\n\r\n"
    assert post(b"Transfer-Encoding: chunked\r\n", chunked) == (
        b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert request(address, "/")[0] == 200  # and the worker serves on
    assert server.stop() == 0
