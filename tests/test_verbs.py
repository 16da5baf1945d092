"""bin/<part>-instance verbs, against a real server: fg start stop restart reload status check debug."""

import contextlib
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import (REPO, datagrams_until, eventually, free_port, logged_error, request,
                      run_script, wait_until_serving)


@pytest.fixture(scope="module")
def verbs(new_buildout):
    address, script_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    buildout = new_buildout("verbs", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        parts += gunicorn-script

        [instance]
        http-address = {address}

        [gunicorn-script]
        recipe = plone.recipe.gunicorn
        mode = script
        bind = {script_address}
    """)
    buildout.run()
    buildout.addresses = {"gunicorn": address, "gunicorn-script": script_address}
    return buildout


def script(buildout, part, *args, timeout=120):
    """Run ``bin/<part>-instance ARGS``; return (exit status, output, stripped)."""
    status, out = run_script(buildout, *args, script=f"{part}-instance", timeout=timeout)
    return status, out.strip()


@pytest.fixture
def cleanup(verbs):
    """Stop whatever a verb test left running, also when it fails."""
    yield
    for part in verbs.addresses:
        pidfile = verbs.path("var", f"{part}.pid")
        if pidfile.exists():
            try:
                group = os.getpgid(int(pidfile.read_text()))
            except (ProcessLookupError, ValueError):
                continue
            if group != os.getpgrp():  # a daemon has its own; never ours
                os.killpg(group, signal.SIGKILL)


def pid_of(buildout, part):
    return int(buildout.path("var", f"{part}.pid").read_text())


@pytest.mark.parametrize("part", ["gunicorn", "gunicorn-script"])
def test_lifecycle_like_bin_instance(verbs, cleanup, part):
    address = verbs.addresses[part]
    assert script(verbs, part, "status") == (3, f"{part}-instance: not running")

    status, out = script(verbs, part, "start")
    assert status == 0, out
    pid = pid_of(verbs, part)
    assert out == f"{part}-instance: started, PID {pid}, listening on {address}"
    assert request(address)[0] == 200

    status, out = script(verbs, part, "status")
    worker = int(re.search(r"1 workers \((\d+)\)", out)[1])
    assert (status, out) == (0, f"{part}-instance: running as PID {pid}, 1 workers "
                                f"({worker}), listening on {address}")
    assert script(verbs, part, "start") == (0, f"{part}-instance: already running as PID {pid}")

    assert script(verbs, part, "reload")[0] == 0
    def replaced():
        status = script(verbs, part, "status")[1]
        return str(worker) not in status and "1 workers" in status
    eventually(replaced, 30, "HUP did not replace the worker", 0.2)
    assert pid_of(verbs, part) == pid  # same master, new worker
    assert request(address)[0] == 200

    status, out = script(verbs, part, "restart")
    assert status == 0, out
    assert pid_of(verbs, part) != pid
    pid = pid_of(verbs, part)
    assert out.splitlines()[-1].startswith(f"{part}-instance: started, PID {pid}")
    assert request(address)[0] == 200

    assert script(verbs, part, "stop") == (0, f"{part}-instance: stopped PID {pid}")
    log = verbs.path("var", "log", f"{part}.log").read_text()
    assert "ERROR" not in log and "exited with code" not in log, log
    with pytest.raises(OSError):
        request(address, timeout=2)
    assert not verbs.path("var", f"{part}.pid").exists()
    assert script(verbs, part, "stop") == (0, f"{part}-instance: not running")
    assert script(verbs, part, "reload") == (7, f"{part}-instance: not running")
    assert script(verbs, part, "status")[0] == 3


def test_start_finds_a_unix_socket_written_as_gunicorn_reads_it(verbs, cleanup):
    # unix://PATH is unix:PATH to gunicorn: var/cli.sock, in the directory it starts in
    status, out = script(verbs, "gunicorn", "start", "-b", "unix://var/cli.sock", timeout=60)
    assert status == 0, out
    assert request(f"unix:{verbs.path('var', 'cli.sock')}")[0] == 200
    # a health check without Host (HTTP/1.0): gunicorn leaves SERVER_PORT empty
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(30)
        client.connect(str(verbs.path("var", "cli.sock")))
        client.sendall(b"GET / HTTP/1.0\r\n\r\n")
        answer = client.makefile("rb").read()
    assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.0 200 OK", answer[:2000]
    assert script(verbs, "gunicorn", "stop")[0] == 0
    # neither start's own request nor the one without Host met an error
    log = verbs.path("var", "log", "gunicorn.log").read_text()
    assert "Error handling request" not in log, log


def test_stop_fails_when_the_server_does_not_go(verbs, cleanup):
    assert script(verbs, "gunicorn", "start")[0] == 0
    pid = pid_of(verbs, "gunicorn")
    os.kill(pid, signal.SIGSTOP)  # a master that cannot act on TERM
    try:
        status, out = script(verbs, "gunicorn", "stop", "--graceful-timeout", "1")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert status == 1
    assert out == f"gunicorn-instance: PID {pid} still runs 11s after TERM; stop it with: kill -QUIT {pid}"
    eventually(lambda: not os.path.exists(f"/proc/{pid}"), 30,  # the pending TERM now stops it
               f"PID {pid} still runs")


@contextlib.contextmanager
def broken_zope_conf(buildout):
    """The instance's zope.conf with a directive Zope does not know, meanwhile."""
    zope_conf = buildout.path("parts", "instance", "etc", "zope.conf")
    good = zope_conf.read_text()
    zope_conf.write_text(good + "\nno-such-directive on\n")
    try:
        yield
    finally:
        zope_conf.write_text(good)


def test_start_fails_when_no_worker_can_load_zope(verbs, cleanup):
    # The master listens, and the kernel accepts connections, before any
    # worker has loaded Zope; here none can.
    with broken_zope_conf(verbs):
        status, out = script(verbs, "gunicorn", "start")
    log = verbs.path("var", "log", "gunicorn.log")
    assert (status, out) == (1, f"gunicorn-instance: did not start; see {log}")
    # The daemon has no terminal: the log says why, in one line.
    zope_conf = verbs.path("parts", "instance", "etc", "zope.conf")
    logged = log.read_text()
    assert logged_error(logged, f"{zope_conf}: 'no-such-directive' is not a known key name"), logged
    assert "Traceback" not in logged
    assert not verbs.path("var", "gunicorn.pid").exists()  # the master stopped


@pytest.mark.parametrize("args", [
    ["--threads", "2"],
    # gunicorn would swap a sync worker given threads for its own gthread worker
    ["--threads", "2", "-k", "plone.recipe.gunicorn.worker.SyncWorker"],
])
def test_check_loads_the_application_without_serving(verbs, args):
    status, out = script(verbs, "gunicorn", "check", *args)
    assert status == 0, out
    assert out.endswith("configuration and application OK: 1 workers "
                        "(plone.recipe.gunicorn.worker.ThreadWorker, 2 threads), "
                        f"binds {verbs.addresses['gunicorn']}")
    with pytest.raises(OSError):
        request(verbs.addresses["gunicorn"], timeout=2)


def test_check_leaves_the_filestorage_index_valid(verbs):
    index = verbs.path("var", "filestorage", "Data.fs.index")
    for _ in range(2):
        status, out = script(verbs, "gunicorn", "check")
        assert status == 0, out
        # ZODB reads a stale index as missing: it rebuilds it from Data.fs
        assert "Ignoring index" not in out
        assert index.stat().st_mtime >= verbs.path("var", "filestorage", "Data.fs").stat().st_mtime


def test_check_reports_an_application_that_does_not_load(verbs):
    # A mistake in zope.conf: ZConfig's message says it all.
    with broken_zope_conf(verbs):
        status, out = script(verbs, "gunicorn-script", "check")
    zope_conf = verbs.path("parts", "instance", "etc", "zope.conf")
    assert (status, out) == (1, "gunicorn-script-instance: the application does not load: "
                                f"{zope_conf}: 'no-such-directive' is not a known key name")
    # Code or ZCML that fails: the traceback says where.
    site_zcml = verbs.path("parts", "instance", "etc", "site.zcml")
    good = site_zcml.read_text()
    site_zcml.write_text(good.replace(
        "</configure>", '<include package="no.such.package" />\n</configure>'))
    try:
        status, out = script(verbs, "gunicorn-script", "check")
    finally:
        site_zcml.write_text(good)
    assert status == 1
    assert "Traceback" in out and "No module named 'no'" in out, out
    assert out.splitlines()[-1] == "gunicorn-script-instance: the application does not load (see above)"


USER_LOGGING = """\
[loggers]
keys = root, gunicorn.error
[handlers]
keys = console
[formatters]
keys = mine
[logger_root]
level = WARNING
handlers = console
[logger_gunicorn.error]
level = INFO
handlers = console
propagate = 0
qualname = gunicorn.error
[handler_console]
class = StreamHandler
args = (sys.stdout,)
formatter = mine
[formatter_mine]
format = MINE %(levelname)s %(name)s %(message)s
"""


@pytest.mark.parametrize("part", ["gunicorn", "gunicorn-script"])
def test_loglevel_rules_the_recipes_logging_and_a_users_logconfig_keeps_its_levels(
        verbs, servers, tmp_path, part):
    address, script_path = verbs.addresses[part], verbs.path("bin", f"{part}-instance")

    def serve(*args):
        server = servers([script_path, *args], verbs.dir, name=f"{part} {' '.join(args)}")
        assert wait_until_serving(server, address) == 200
        assert server.stop() == 0
        return server.log_path.read_text(errors="replace")  # all of it, stop included

    zope_info = "Ready to handle requests"  # Zope's own logger, at INFO
    assert zope_info in serve()
    # The recipe's logging configuration: Zope's event log follows --log-level.
    assert zope_info not in serve("--log-level", "warning")
    # A user's own: its root level (WARNING) holds under the default loglevel.
    user_logging = tmp_path / "logging.ini"
    user_logging.write_text(USER_LOGGING)
    output = serve("--log-config", str(user_logging))
    assert "MINE INFO gunicorn.error Booting worker" in output, output
    assert zope_info not in output, output
    # A format gunicorn's access log would use; in ini mode the translogger writes.
    unused = "access_log_format is not used: the pipeline's translogger writes"
    assert (unused in serve("--access-logformat", "%(s)s")) == (part == "gunicorn"), part


def test_debug_runs_one_worker_with_code_reload(verbs, servers):
    address = verbs.addresses["gunicorn-script"]
    server = servers([verbs.path("bin", "gunicorn-script-instance"), "debug"], verbs.dir,
                     name="debug")
    assert wait_until_serving(server, address) == 200
    [worker] = server.workers()
    assert " DEBUG " in server.output()  # --log-level debug reaches the logging configuration
    app_module = verbs.path("parts", "gunicorn-script", "gunicornapp.py")
    time.sleep(1.5)
    app_module.touch()  # code changed: the reloader replaces the worker
    eventually(lambda: server.workers() not in ([worker], []), 30, server.output, 0.2)
    assert wait_until_serving(server, address) == 200
    assert server.stop() == 0


def test_relative_paths_in_the_part_are_the_buildouts_wherever_it_starts(
        new_buildout, servers, tmp_path):
    buildout = new_buildout("relative", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [gunicorn]
        bind = unix:var/zope.sock
        pidfile = var/relative.pid
        statsd-host = unix:var/statsd.sock
        syslog = true
        syslog-addr = unix://var/syslog.sock#dgram
    """)
    buildout.run()
    bin_script = buildout.path("bin", "gunicorn-instance")
    with contextlib.ExitStack() as listeners:  # statsd's and syslog's, in the buildout's var
        statsd = listeners.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        syslog = listeners.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        statsd.bind(str(buildout.path("var", "statsd.sock")))
        syslog.bind(str(buildout.path("var", "syslog.sock")))
        server = servers([bin_script, "fg"], tmp_path, name="relative")  # started elsewhere
        address = f"unix:{buildout.path('var', 'zope.sock')}"
        assert wait_until_serving(server, address) == 200
        datagrams_until(statsd, b"gunicorn.request.status.200:1|c")
        datagrams_until(syslog, b"Listening at: " + address.encode())
    assert buildout.path("var", "relative.pid").read_text().strip() == str(server.pid)

    def verb(name):  # from a third directory
        return subprocess.run([bin_script, name], cwd="/", capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    status = verb("status")
    assert status.returncode == 0 and f"listening on {address}" in status.stdout, status
    assert verb("stop").returncode == 0
    assert not server.running()


@pytest.fixture(scope="module")
def www(new_buildout):
    """A part whose name does not say gunicorn: its processes are told by the script name."""
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("www", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        parts = instance www

        [www]
        recipe = plone.recipe.gunicorn
        bind = {address}
    """)
    buildout.run()
    buildout.address = address
    return buildout


def test_pid_file_tells_this_server_from_a_program_that_took_its_pid(www, servers):
    pidfile = www.path("var", "www.pid")
    server = servers([www.path("bin", "www-instance")], www.dir, name="www")
    assert wait_until_serving(server, www.address) == 200
    # A second fg finds the first by its pid file, and leaves that file alone.
    assert script(www, "www", timeout=60) == (
        1, f"www-instance: already running as PID {server.pid} (pidfile {pidfile}); stop it first")
    assert script(www, "www", "status")[1].startswith(f"www-instance: running as PID {server.pid}")
    assert server.stop() == 0

    # After a crash, the pid in the file belongs to another program.
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        pidfile.write_text(f"{other.pid}\n")
        assert script(www, "www", "status") == (
            1, f"www-instance: not running, but the pid file {pidfile} is left")
        assert script(www, "www", "stop") == (0, "www-instance: not running")
        assert other.poll() is None  # not sent TERM
        server = servers([www.path("bin", "www-instance")], www.dir, name="www again")
        assert wait_until_serving(server, www.address) == 200
        assert int(pidfile.read_text()) == server.pid
    finally:
        other.kill()
        other.wait()


@pytest.fixture(scope="module")
def zeo_down(new_buildout):
    """A ZEO client whose ZEO server does not run."""
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("zeodown", f"""
        [buildout]
        extends = {REPO}/buildout.cfg

        [instance]
        http-address = {address}
        zeo-client = on
        zeo-address = 127.0.0.1:{free_port()}
    """)
    buildout.run()
    buildout.address = address
    return buildout


def test_workers_go_with_their_master(zeo_down, servers):
    server = servers([zeo_down.path("bin", "gunicorn-instance"), "--workers", "2"],
                     zeo_down.dir, name="zeo down")
    # Both workers wait for the ZEO server while loading Zope.
    server.wait_for_output(lambda out: out.count("Booting worker") == 2, timeout=30)
    workers = server.workers()
    assert len(workers) == 2
    server.signal(signal.SIGKILL)
    server.proc.wait()
    eventually(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10,
               "workers outlived their master")
    with pytest.raises(OSError):  # no orphan keeps the port
        request(zeo_down.address, timeout=2)
