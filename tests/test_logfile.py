"""The recipe's log handlers, on their own (a server's logs: test_recipe, test_runtime)."""

import logging
import socket
import time

from plone.recipe.gunicorn.logfile import SysLogHandler


def syslog_daemon(path):
    """A syslog daemon's socket, as rsyslog and journald open /dev/log."""
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(path))
    daemon.settimeout(5)
    return daemon


def test_a_syslog_daemon_that_restarts_gets_the_messages_again(tmp_path, capsys):
    path = tmp_path / "log.sock"
    daemon = syslog_daemon(path)
    handler = SysLogHandler(str(path))
    log = logging.Logger("test")  # not registered: nothing else logs through it
    log.addHandler(handler)
    try:
        log.error("first")
        assert daemon.recv(1024) == b"<11>first\x00"
        daemon.close()
        path.unlink()  # the daemon has stopped
        for n in range(5):
            log.error("away %d", n)
        daemon = syslog_daemon(path)  # and started again
        time.sleep(1.1)  # the handler tries again a second after it lost it
        log.error("back")
        assert daemon.recv(1024) == b"<11>back\x00"
    finally:
        handler.close()
        daemon.close()
    stderr = capsys.readouterr().err.splitlines()
    said = f"plone.recipe.gunicorn: syslog at {path}: process "
    # one line each, not Python's traceback for every message lost
    assert len(stderr) == 2, stderr
    assert stderr[0].startswith(said) and stderr[0].endswith(
        " cannot send to it (No such file or directory); drops its syslog messages until "
        "it answers again")
    assert stderr[1].startswith(said) and stderr[1].endswith(" sends to it again")
