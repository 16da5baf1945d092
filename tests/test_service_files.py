"""Files that run a part as a service: a systemd unit and socket, a logrotate
snippet and a supervisor program section.  Written only when asked for, and
run by the programs that read them: systemd's own tools, logrotate and
supervisord, against a real gunicorn serving Zope.
"""

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, eventually, free_port, request, wait_until_serving

GRACEFUL_TIMEOUT = 7
STOP_TIMEOUT = GRACEFUL_TIMEOUT + 10
SERVICE_FILES = {"gunicorn.service", "gunicorn.socket", "logrotate.conf", "supervisor.conf"}


def tool(name):
    """A program the tests run; ``.ci/run`` installs the Debian packages."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        pytest.fail(f"{name} is not installed: apt-get install systemd logrotate, "
                    "pip install -r requirements-test.txt")
    return path


@pytest.fixture(scope="module")
def services(new_buildout):
    """A part with every service file switched on (in the spellings users
    write), and a part with none."""
    port = free_port()
    buildout = new_buildout("services", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        parts = instance gunicorn plain

        [instance]
        http-address = 127.0.0.1:{port} [::1]:{port} unix:var/zope.sock

        [gunicorn]
        systemd-unit = true
        systemd-socket = on
        systemd-user = www-data
        systemd-group = www-data
        logrotate = yes
        supervisor = True
        graceful-timeout = {GRACEFUL_TIMEOUT}

        [plain]
        recipe = plone.recipe.gunicorn
        bind = 127.0.0.1:{free_port()}
    """)
    buildout.run()
    buildout.addresses = [f"127.0.0.1:{port}", f"[::1]:{port}",
                          f"unix:{buildout.path('var', 'zope.sock')}"]
    buildout.location = buildout.path("parts", "gunicorn")
    return buildout


def installed_options(buildout, part):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(buildout.path(".installed.cfg"))
    return parser[part]


def unit_entries(path):
    """``[(section, key, value)]`` of a systemd unit file; keys may repeat."""
    entries, section = [], None
    for line in Path(path).read_text().splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            key, _, value = line.partition("=")
            entries.append((section, key, value))
    return entries


def values(entries, section, key):
    return [v for s, k, v in entries if (s, k) == (section, key)]


def test_files_are_written_only_when_switched_on(services):
    location = services.location
    assert {p.name for p in location.iterdir()} == {"gunicorn.ini", *SERVICE_FILES}
    assert [p.name for p in services.path("parts", "plain").iterdir()] == ["gunicorn.ini"]

    options = installed_options(services, "gunicorn")
    assert options["systemd-unit-file"] == str(location / "gunicorn.service")
    assert options["systemd-socket-file"] == str(location / "gunicorn.socket")
    assert options["logrotate-file"] == str(location / "logrotate.conf")
    assert options["supervisor-file"] == str(location / "supervisor.conf")
    for name in SERVICE_FILES:  # buildout removes them when the part goes
        assert str(location / name) in options["__buildout_installed__"].split()
    assert not any(k.endswith("-file") and k != "config-file"
                   for k in installed_options(services, "plain"))


def test_switching_a_file_off_removes_it(new_buildout):
    buildout = new_buildout("switch", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = 127.0.0.1:{free_port()}
        [gunicorn]
        logrotate = 1
    """)
    buildout.run()
    rotate = buildout.path("parts", "gunicorn", "logrotate.conf")
    assert rotate.exists()
    buildout.run("gunicorn:logrotate=off")
    assert not rotate.exists()
    assert "logrotate-file" not in installed_options(buildout, "gunicorn")


def test_systemd_unit_runs_the_script_in_the_foreground_and_stops_gracefully(services):
    unit = unit_entries(services.location / "gunicorn.service")
    assert values(unit, "Service", "Type") == ["notify"]
    assert values(unit, "Service", "ExecStart") == [f"{services.path('bin', 'gunicorn-instance')} fg"]
    assert values(unit, "Service", "ExecReload") == ["/bin/kill -s HUP $MAINPID"]
    assert values(unit, "Service", "KillSignal") == ["SIGTERM"]
    assert values(unit, "Service", "KillMode") == ["mixed"]
    assert values(unit, "Service", "TimeoutStopSec") == [str(STOP_TIMEOUT)]
    assert values(unit, "Service", "WorkingDirectory") == [str(services.dir)]
    assert values(unit, "Service", "Restart") == ["on-failure"]
    assert values(unit, "Service", "User") == values(unit, "Service", "Group") == ["www-data"]
    assert values(unit, "Unit", "Requires") == ["gunicorn.socket"]
    assert values(unit, "Unit", "After") == ["network.target", "gunicorn.socket"]
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]

    sockets = unit_entries(services.location / "gunicorn.socket")
    assert values(sockets, "Socket", "ListenStream") == [
        address.removeprefix("unix:") for address in services.addresses]
    assert values(sockets, "Socket", "BindIPv6Only") == []  # [::1] takes no IPv4
    assert values(sockets, "Install", "WantedBy") == ["sockets.target"]


def test_systemd_socket_on_every_interface_binds_both_families(new_buildout):
    """``*:PORT``, waitress's every interface: systemd binds [::] next to
    0.0.0.0 on one port only as IPv6 only, as gunicorn does for the pair."""
    port = free_port()
    buildout = new_buildout("everywhere", f"""
        [buildout]
        extends = {REPO}/buildout.cfg

        [instance]
        http-address = *:{port}

        [gunicorn]
        systemd-unit = true
        systemd-socket = true
    """)
    buildout.run()
    location = buildout.path("parts", "gunicorn")
    sockets = unit_entries(location / "gunicorn.socket")
    assert values(sockets, "Socket", "ListenStream") == [f"0.0.0.0:{port}", f"[::]:{port}"]
    assert values(sockets, "Socket", "BindIPv6Only") == ["ipv6-only"]
    result = subprocess.run(
        [tool("systemd-analyze"), "verify", location / "gunicorn.socket", location / "gunicorn.service"],
        capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_analyze_verify_accepts_the_unit_and_socket(services):
    result = subprocess.run(
        [tool("systemd-analyze"), "verify",
         services.location / "gunicorn.socket", services.location / "gunicorn.service"],
        capture_output=True, text=True, timeout=60)
    print(result.stdout, result.stderr)
    # verify exits 0 on unknown keys and bad values too; it warns on stderr.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_socket_activation_serves_and_tells_systemd_it_is_ready(
        services, servers, monkeypatch, tmp_path):
    """What systemd does with the two files: listen on the socket's
    ListenStream= addresses, start ExecStart in WorkingDirectory on the first
    connection, with the sockets (LISTEN_FDS) and NOTIFY_SOCKET; stop with
    KillSignal to the main process only (KillMode=mixed)."""
    unit = unit_entries(services.location / "gunicorn.service")
    streams = values(unit_entries(services.location / "gunicorn.socket"), "Socket", "ListenStream")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(90)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    try:
        server = servers(
            [tool("systemd-socket-activate"), "--setenv=NOTIFY_SOCKET",
             *(f"--listen={stream}" for stream in streams),
             *shlex.split(values(unit, "Service", "ExecStart")[0])],
            values(unit, "Service", "WorkingDirectory")[0], name="socket-activated gunicorn")
        # The first connection starts gunicorn; it waits in the socket's backlog.
        assert wait_until_serving(server, services.addresses[0]) == 200
        assert notify.recv(4096).split(b"\n")[0] == b"READY=1"
        for address in services.addresses:
            assert request(address)[0] == 200, address
        assert "Listening at: http://127.0.0.1" in server.output()
    finally:
        notify.close()
    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=STOP_TIMEOUT) == 0
    assert not services.path("var", "gunicorn.pid").exists()


def test_logrotate_debug_accepts_the_snippet(services, tmp_path):
    result = subprocess.run(
        [tool("logrotate"), "--debug", "-s", tmp_path / "state", services.location / "logrotate.conf"],
        capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    assert "error" not in output.lower(), output  # logrotate ignores some errors with 0
    for name in ("gunicorn.log", "gunicorn-access.log"):
        assert f"considering log {services.path('var', 'log', name)}" in output


def test_logrotate_rotates_the_logs_of_a_running_server(services, servers, tmp_path, figures):
    log_dir = services.path("var", "log")
    event, access = log_dir / "gunicorn.log", log_dir / "gunicorn-access.log"
    rotate = [tool("logrotate"), "-v", "-f", "-s", tmp_path / "state",
              services.location / "logrotate.conf"]
    address = services.addresses[0]
    server = servers([services.path("bin", "gunicorn-instance")], services.dir, name="gunicorn")
    wait_until_serving(server, address)
    for _ in range(3):
        assert request(address, "/before-rotation")[0] == 404
    wait_for_text(access, "/before-rotation")

    result = subprocess.run(rotate, capture_output=True, text=True, timeout=60)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("running postrotate script") == 1  # sharedscripts
    # USR1 from the postrotate script: the master logs it into the new event log.
    wait_for_text(event, "Handling signal: usr1")
    for _ in range(5):
        assert request(address, "/after-rotation")[0] == 404
    wait_for_text(access, "/after-rotation", count=5)

    rotated = (log_dir / "gunicorn-access.log.1").read_text()
    new = access.read_text()
    figures(f"logrotate on a running server: {new.count('/after-rotation')} of 5 requests "
            f"in the new access log, {rotated.count('/before-rotation')} of 3 earlier "
            "ones in the rotated one")
    assert (rotated.count("/before-rotation"), rotated.count("/after-rotation")) == (3, 0)
    assert (new.count("/before-rotation"), new.count("/after-rotation")) == (0, 5)
    assert "Handling signal: usr1" not in (log_dir / "gunicorn.log.1").read_text()

    server.signal(signal.SIGTERM)
    assert server.proc.wait(timeout=STOP_TIMEOUT) == 0
    # No server, and then a pid file left by a crash whose pid another program
    # got since: rotation still succeeds, and USR1 (which would end that
    # program) goes to nobody.
    pidfile = services.path("var", "gunicorn.pid")
    other = subprocess.Popen(["sleep", "60"])
    try:
        for situation in ("stopped", "stale pid file"):
            if situation == "stale pid file":
                pidfile.write_text(f"{other.pid}\n")
            event.write_text("something to rotate\n")
            result = subprocess.run(rotate, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, (situation, result.stderr)
            assert "error" not in result.stderr.lower(), (situation, result.stderr)
            assert result.stderr.count("running postrotate script") == 1, result.stderr
        assert other.poll() is None, "the program with the stale pid got USR1"
    finally:
        other.kill()
        other.wait()
    pidfile.unlink()


def wait_for_text(path, text, count=1, timeout=20):
    eventually(lambda: path.exists() and path.read_text().count(text) >= count, timeout,
               f"{text!r} not in {path}")


def test_supervisor_program_section(services):
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
    parser.read(services.location / "supervisor.conf")
    assert parser.sections() == ["program:gunicorn"]
    program = parser["program:gunicorn"]
    assert program["command"] == f"{services.path('bin', 'gunicorn-instance')} fg"
    assert program["directory"] == str(services.dir)
    assert program["stopsignal"] == "TERM"
    assert program["stopwaitsecs"] == str(STOP_TIMEOUT)
    assert program["autorestart"] == "true"
    assert program["redirect_stderr"] == "true"


def test_supervisord_serves_and_stops_the_program(services, servers, tmp_path):
    bin_dir = Path(sys.executable).parent
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""\
[supervisord]
logfile = {tmp_path}/supervisord.log
pidfile = {tmp_path}/supervisord.pid
childlogdir = {tmp_path}

[unix_http_server]
file = {tmp_path}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{tmp_path}/supervisor.sock

[include]
files = {installed_options(services, "gunicorn")["supervisor-file"]}
""")

    def ctl(*args):
        result = subprocess.run([tool(str(bin_dir / "supervisorctl")), "-c", conf, *args],
                                capture_output=True, text=True, timeout=120)
        return result.returncode, result.stdout.strip()

    supervisord = servers([tool(str(bin_dir / "supervisord")), "-n", "-c", conf], tmp_path,
                          name="supervisord")
    address = services.addresses[0]
    assert wait_until_serving(supervisord, address) == 200
    # supervisord says STARTING until the program has run for startsecs
    # (1 s); a fast start serves before that.
    deadline = time.monotonic() + 10
    code, status = ctl("status", "gunicorn")
    while "STARTING" in status and time.monotonic() < deadline:
        time.sleep(0.2)
        code, status = ctl("status", "gunicorn")
    assert code == 0 and "RUNNING" in status, status
    # The program is the gunicorn master itself: nothing daemonized away.
    code, pid = ctl("pid", "gunicorn")
    assert pid == services.path("var", "gunicorn.pid").read_text().strip()

    assert ctl("stop", "gunicorn") == (0, "gunicorn: stopped")
    code, status = ctl("status", "gunicorn")
    assert "STOPPED" in status, status
    with pytest.raises(OSError):
        request(address, timeout=2)
    assert not services.path("var", "gunicorn.pid").exists()
    log = (tmp_path / "supervisord.log").read_text()
    assert "stopped: gunicorn (exit status 0)" in log, log

    ctl("shutdown")
    assert supervisord.proc.wait(timeout=30) == 0
