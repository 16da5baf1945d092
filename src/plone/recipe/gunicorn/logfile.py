"""The part's logs: handlers that rotation and a restarting syslog daemon
cannot break.

A master and its workers write the same files, ``var/log/<part>.log`` and
``var/log/<part>-access.log``.  logrotate moves them away; each process then
opens the file anew, by itself (the handler notices the move, as logging's
``WatchedFileHandler`` does) or when ``USR1`` says so.  Two things can make
that open fail in a worker: the workers run as gunicorn's ``user``, to whom
the master (root) gave no file, or the directory is gone.  Python's handler
then raises into the request that logs (its connection is dropped, and so is
every later one's) or into the signal handler.  This one writes on to the
file it had open and says so once on stderr; the next line tries again.

A master that runs as root and starts its workers as another ``user`` or
``group`` gives them every log file it opens (gunicorn does so for its own
``errorlog`` and ``accesslog`` once, at the start), also the files it opens
anew after a rotation: ``give_logs_to``.

With ``syslog = true`` every message, the access log's too, also goes to a
syslog daemon, which may restart while the server runs (logrotate restarts
rsyslog).  Python's handler then prints a traceback on stderr for every
message it cannot send, and over TCP never connects again: the server's
syslog stays silent until it is restarted.  ``SysLogHandler`` drops the
messages while the daemon is away, says so once, and connects again.
"""

import logging
import logging.handlers
import os
import socket
import sys
import time


class WatchedFileHandler(logging.handlers.WatchedFileHandler):
    """logging's ``WatchedFileHandler``, whose reopening never fails a caller."""

    owner = None  # (uid, gid) the master gives the files it opens; see give_logs_to
    failed = None  # the error that kept the file from being opened anew, once said

    def emit(self, record):
        self.reopenIfNeeded()
        if self.stream is None:  # opened lazily (delay), or closed
            self.reopen()
        if self.stream is not None:
            logging.StreamHandler.emit(self, record)

    def reopenIfNeeded(self):
        try:
            now = os.stat(self.baseFilename)
        except OSError:
            now = None
        if now is None or (now.st_dev, now.st_ino) != (self.dev, self.ino):
            self.reopen()

    def reopen(self):
        """Open the file anew and write there; if it cannot be opened, keep
        writing to the file open until now and say so, once per error."""
        try:
            stream = self._open()
        except OSError as exc:
            if str(exc) != self.failed:
                self.failed = str(exc)
                meanwhile = ("writes on to the file it had open" if self.stream is not None
                             else "drops its lines")
                sys.stderr.write(
                    f"plone.recipe.gunicorn: cannot open the log file {self.baseFilename} "
                    f"anew ({exc.strerror}); process {os.getpid()} {meanwhile}\n")
                sys.stderr.flush()
            return
        self.failed = None
        old, self.stream = self.stream, stream
        self._statstream()
        if self.owner is not None:
            _give(stream.fileno(), self.owner)
        if old is not None:
            old.flush()
            old.close()


def give_logs_to(uid, gid):
    """In the master: let workers that run as ``uid``/``gid`` reopen every log
    file, now and after each rotation.  Only root gives files away; a master
    that runs as the workers' user has nothing to give."""
    if os.geteuid() != 0 or (uid, gid) == (os.geteuid(), os.getegid()):
        WatchedFileHandler.owner = None
        return
    WatchedFileHandler.owner = (uid, gid)
    for handler in file_handlers():
        if handler.stream is not None:
            _give(handler.stream.fileno(), (uid, gid))


def file_handlers():
    """Every handler that writes a file, of every logger (gunicorn's
    ``glogging.loggers()`` leaves out the root logger, the event log's)."""
    loggers = [logging.getLogger()] + [
        log for log in logging.Logger.manager.loggerDict.values()
        if isinstance(log, logging.Logger)]
    seen = []
    for log in loggers:
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler) and handler not in seen:
                seen.append(handler)
    return seen


def _give(fd, owner):
    try:
        os.fchown(fd, *owner)
    except OSError:  # a file that is not ours to give (/dev/null, a root-owned path)
        pass


class SysLogHandler(logging.handlers.SysLogHandler):
    """logging's ``SysLogHandler``, which outlives the syslog daemon's restart.

    A message it cannot send is dropped.  The next message a second later
    connects again, the wait doubling up to a minute while the daemon stays
    away (each try given ``CONNECT_TIMEOUT`` seconds: a connection over TCP
    can block the request that logs).  Each process says once on stderr
    that the daemon went away, and once that it sends again, however many
    of its loggers send there."""

    CONNECT_TIMEOUT = 1.0
    LONGEST_WAIT = 60.0

    said_away = set()  # (process, address): what a process said it cannot send to
    away = False
    _wait = 1.0
    _next_try = 0.0
    _failed = None  # the error of the message being sent, from handleError

    def emit(self, record):
        if self.away:
            if time.monotonic() < self._next_try:
                return
            try:
                self._connect_again()
            except OSError as exc:
                self._lost(exc)
                return
        super().emit(record)  # which gives an error to handleError
        failed, self._failed = self._failed, None  # and keeps no traceback
        if failed is not None:
            self._lost(failed)
        elif self.away:
            self.away, self._wait = False, 1.0
            if (os.getpid(), self.address) in self.said_away:  # a worker inherits the set
                self.said_away.discard((os.getpid(), self.address))
                self._say("sends to it again")

    def handleError(self, record):
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            self._failed = error
        else:  # a message that cannot be formatted: Python's report
            super().handleError(record)

    def _connect_again(self):
        if self.socket is not None:
            self.socket.close()
        if self.unixsocket:
            self._connect_unixsocket(self.address)  # the kind that worked before
        elif self.socktype == socket.SOCK_STREAM:
            self.socket = socket.create_connection(self.address, self.CONNECT_TIMEOUT)
            self.socket.settimeout(None)  # sending blocks, as Python's does
        # over UDP there is nothing to connect

    def _lost(self, error):
        if self.away:
            self._wait = min(2 * self._wait, self.LONGEST_WAIT)
        else:
            self.away = True
            if (os.getpid(), self.address) not in self.said_away:
                self.said_away.add((os.getpid(), self.address))
                self._say(f"cannot send to it ({error.strerror or error}); drops its "
                          "syslog messages until it answers again")
        self._next_try = time.monotonic() + self._wait

    def _say(self, what):
        where = self.address if self.unixsocket else "%s:%s" % self.address
        sys.stderr.write(f"plone.recipe.gunicorn: syslog at {where}: process {os.getpid()} "
                         f"{what}\n")
        sys.stderr.flush()
