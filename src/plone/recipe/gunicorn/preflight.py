"""Checks made in the master before gunicorn starts: refuse, in one line, what
would corrupt a database, hang, or fail later in a less clear way.

Each check raises ``Refused`` with the sentence to print.
"""

import errno
import os
import socket

from gunicorn import util
from gunicorn.glogging import parse_syslog_address

from plone.recipe.gunicorn.control import master_pid
from plone.recipe.gunicorn.settings import SYSLOG_ADDRESSES


class Refused(Exception):
    """The server must not start; the message says why and what to do."""


class Database:
    """What the recipe knows of the instance's database, for the rules on workers.

    ``shared``: True for a ZEO client or RelStorage, False for a FileStorage,
    None when unknown (no rule applies then).  ``zeo_client_client``: the
    instance's option of that name, a ZEO client cache kept in a file that
    one process may open (it is locked); every other worker would fail to
    start with a ``LockError``, and gunicorn then stops the whole server.
    """

    def __init__(self, shared=None, zeo_client_client=None):
        self.shared = shared
        self.zeo_client_client = zeo_client_client or None

    @property
    def one_process(self):
        """What only one process may open, in words; None when workers may be many."""
        if self.shared is False:
            return "the FileStorage"
        if self.zeo_client_client:
            return f"the ZEO cache file of zeo-client-client = {self.zeo_client_client}"
        return None


def check_database_safety(cfg, database):
    """Never fork after opening a database; never two processes on a FileStorage
    or on a persistent ZEO cache."""
    if cfg.preload_app:
        raise Refused(
            "preload_app would open the Zope database in the gunicorn master and "
            "share it with every forked worker; set preload_app = false")
    if cfg.workers > 1 and database.shared is False:
        raise Refused(
            f"{cfg.workers} workers on a FileStorage: one process must own a "
            "FileStorage; use 1 worker, or serve the database through ZEO or RelStorage")
    if cfg.workers > 1 and database.zeo_client_client:
        raise Refused(
            f"{cfg.workers} workers with zeo-client-client = {database.zeo_client_client}: "
            "one process may open that ZEO cache file, so every worker but the first "
            "would fail to start; use 1 worker, or remove zeo-client-client from the "
            "instance, so that each worker keeps its cache in memory")


def check_pidfile(cfg, prog):
    """A pidfile of this running server refuses; a stale one is removed."""
    path = cfg.pidfile
    if not path or not os.path.exists(path) or os.environ.get("GUNICORN_PID"):
        return  # (a master re-executed by USR2 writes <pidfile>.2 next to its parent's)
    pid = master_pid(cfg, prog)
    if pid and pid != os.getpid():
        raise Refused(f"already running as PID {pid} (pidfile {path}); stop it first")
    # Left behind by a crash (or its pid now belongs to another program).
    os.unlink(path)


def check_binds(cfg):
    """Each address to bind is free: one clear line instead of gunicorn's retries."""
    if os.environ.get("LISTEN_FDS") or os.environ.get("GUNICORN_FD"):
        return  # sockets inherited from systemd or from a re-executing master
    for address in cfg.bind:
        if address.startswith("unix:"):
            _check_unix(util.parse_address(address), address)  # unix:PATH or unix://PATH
        elif not address.startswith("fd://"):
            _check_tcp(address)


def check_syslog(cfg):
    """The syslog daemon to log to listens.  Without one on a unix socket the
    server would drop every syslog message from its first (the recipe's
    handler says so on stderr, which ``start`` has closed: without a word);
    without one over TCP gunicorn stops with a line that does not say syslog.
    A daemon that goes away later is ``logfile.SysLogHandler``'s to outlive."""
    if not cfg.syslog:
        return
    try:
        kind, address = parse_syslog_address(cfg.syslog_addr)
    except RuntimeError as exc:  # --log-syslog-to on the command line
        raise Refused(f"syslog-addr {cfg.syslog_addr}: {str(exc).rstrip('.')}; gunicorn "
                      f"reads {SYSLOG_ADDRESSES}")
    if isinstance(address, str):  # a unix socket, of the kind given or either
        probes = [(socket.AF_UNIX, kind, address) for kind in
                  ([kind] if kind else [socket.SOCK_DGRAM, socket.SOCK_STREAM])]
    elif kind == socket.SOCK_STREAM:
        try:  # each address the host name resolves to, resolved once
            probes = [(family, kind, sockaddr) for family, _, _, _, sockaddr
                      in socket.getaddrinfo(*address, type=kind)]
        except OSError as exc:  # a host name that does not resolve
            probes, reason = [], str(exc)
    else:
        return  # UDP: nothing answers
    for family, kind, target in probes:
        with socket.socket(family, kind) as probe:  # as SysLogHandler tries them
            probe.settimeout(5)
            try:
                probe.connect(target)
                return
            except OSError as exc:
                reason = exc.strerror or str(exc)  # a timeout has no strerror
    raise Refused(
        f"syslog-addr {cfg.syslog_addr}: no syslog daemon listens there ({reason}); "
        "start one, give syslog-addr its address, or set syslog = false")


def _check_unix(path, address):
    if not os.path.exists(path):
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise Refused(f"cannot listen on {address}: directory {directory} does not exist")
        return
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return  # a leftover socket file; gunicorn replaces it
    raise Refused(f"{address} is in use by another server; stop it or change http-address or bind")


def _check_tcp(address):
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot listen on {address}: {exc}")
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gunicorn binds: SO_REUSEADDR, so sockets in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Refused(
                    f"{address} is in use by another program; stop it or change "
                    "http-address or bind") from None
            raise Refused(f"cannot listen on {address}: {exc.strerror}") from None
