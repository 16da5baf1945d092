"""bin/<part>-instance at start: misconfigurations exit non-zero with one clear line."""

import os
import signal
import socket
import subprocess

import pytest

from conftest import REPO, free_port, wait_until_serving


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


def start_refused(buildout, *args):
    """Run the script expecting a refusal; return its output lines."""
    result = subprocess.run([str(buildout.path("bin", "gunicorn-instance")), *args],
                            cwd=buildout.dir, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
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


def test_live_pidfile_refuses_and_stale_one_does_not_block(fs, servers):
    first = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="first")
    assert wait_until_serving(first, fs.address) == 200
    line = start_refused(fs)
    assert line == (f"gunicorn-instance: already running as PID {first.pid} "
                    f"(pidfile {fs.path('var', 'gunicorn.pid')}); stop it first")

    # A crash: the master and its worker die without removing the pidfile.
    for pid in [*first.workers(), first.pid]:
        os.kill(pid, signal.SIGKILL)
    first.proc.wait()
    assert fs.path("var", "gunicorn.pid").read_text().strip() == str(first.pid)
    second = servers([fs.path("bin", "gunicorn-instance")], fs.dir, name="second")
    assert wait_until_serving(second, fs.address) == 200
    assert int(fs.path("var", "gunicorn.pid").read_text()) == second.pid
