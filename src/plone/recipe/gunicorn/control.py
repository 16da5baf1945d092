"""The verbs of ``bin/<part>-instance``, as an integrator knows them from ``bin/instance``.

    fg        serve in the foreground (the default; what systemd and supervisor run)
    start     serve as a daemon; returns once the server answers, or fails
    stop      TERM, then wait for a graceful exit
    restart   stop, then start
    reload    HUP: new configuration and code, connections kept
    status    running or not, pid, workers, binds (LSB exit codes)
    check     validate the configuration and load the application, without serving
    debug     foreground, one worker, code reload, Zope's debug mode

The pid file (``var/<part>.pid`` by default) is how the verbs find the
master.  Exit codes follow the LSB: ``status`` 0 running, 1 dead with a pid
file left, 3 not running; ``reload`` 7 when not running; 1 for a failure.
"""

import errno
import os
import pwd
import signal
import socket
import sys
import time
import traceback

from gunicorn import util
from gunicorn.errors import AppImportError

VERBS = ("fg", "start", "stop", "restart", "reload", "status", "check", "debug")
DEBUG_ENV = "PLONE_RECIPE_GUNICORN_DEBUG"

# LSB init script exit codes
OK, FAILED, DEAD_WITH_PIDFILE, NOT_RUNNING_STATUS, NOT_RUNNING = 0, 1, 1, 3, 7


def split_verb(argv):
    """``(verb, gunicorn arguments)``; without a verb, ``fg``."""
    if argv and argv[0] in VERBS:
        return argv[0], list(argv[1:])
    return "fg", list(argv)


def gunicorn_args(verb, args):
    """The gunicorn command line a verb adds to the user's arguments."""
    if verb == "start":
        return [*args, "--daemon"]
    if verb == "debug":
        return ["--reload", "--workers", "1", "--log-level", "debug", *args]
    return args


def master_pid(cfg, prog):
    """The pid in the pid file if that process runs and is this server, else None.

    A pid file left by a crash may name a process that has since got its
    pid: one whose command line names neither gunicorn nor ``prog`` (the
    script, ``<part>-instance``) is not this server.
    """
    try:
        with open(cfg.pidfile) as f:
            pid = int(f.read().strip())
    except (OSError, TypeError, ValueError):
        return None
    return pid if _alive(pid) and _is_server(pid, prog) else None


def _is_server(pid, prog):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return True  # alive, and no /proc to say otherwise
    return b"gunicorn" in cmdline or os.fsencode(prog) in cmdline


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:  # a zombie child of ours is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def workers(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def status(cfg, prog):
    pid = master_pid(cfg, prog)
    if pid is None:
        if cfg.pidfile and os.path.exists(cfg.pidfile):
            print(f"{prog}: not running, but the pid file {cfg.pidfile} is left")
            return DEAD_WITH_PIDFILE
        print(f"{prog}: not running")
        return NOT_RUNNING_STATUS
    children = workers(pid)
    print(f"{prog}: running as PID {pid}, {len(children)} workers "
          f"({' '.join(map(str, children)) or 'none'}), listening on {' '.join(cfg.bind)}")
    return OK


def stop(cfg, prog):
    pid = master_pid(cfg, prog)
    if pid is None:
        print(f"{prog}: not running")
        return OK
    os.kill(pid, signal.SIGTERM)
    # gunicorn waits graceful_timeout for requests in flight, then kills.
    wait = cfg.graceful_timeout + 10
    deadline = time.monotonic() + wait
    while _alive(pid):
        if time.monotonic() > deadline:
            print(f"{prog}: PID {pid} still runs {wait}s after TERM; "
                  f"stop it with: kill -QUIT {pid}", file=sys.stderr)
            return FAILED
        time.sleep(0.1)
    print(f"{prog}: stopped PID {pid}")
    return OK


def reload(cfg, prog):
    pid = master_pid(cfg, prog)
    if pid is None:
        print(f"{prog}: not running", file=sys.stderr)
        return NOT_RUNNING
    os.kill(pid, signal.SIGHUP)
    print(f"{prog}: sent HUP to PID {pid}: new configuration, workers replaced gracefully")
    return OK


def start(application, prog, log_hint, timeout=120):
    """Daemonize the server and return once it answers HTTP on its first bind.

    The master listens before its workers have loaded Zope, and the kernel
    accepts connections for it meanwhile: only an HTTP answer says that a
    worker serves.  A worker that cannot load Zope (a broken zope.conf, a ZEO
    server that does not answer within ZEO's wait) makes the master stop.
    """
    cfg = application.cfg
    if not cfg.pidfile:
        print(f"{prog}: start needs a pidfile; set the part's pidfile option", file=sys.stderr)
        return FAILED
    child = os.fork()
    if child == 0:  # becomes the daemon: gunicorn forks twice and detaches
        # The master and its workers all come out of this call; each ends
        # with its own SystemExit, which must keep its exit status.
        application.run()
        os._exit(OK)
    _, status = os.waitpid(child, 0)  # gunicorn has daemonized, or failed before
    began, seen = time.monotonic(), False
    while status == 0 and time.monotonic() - began < timeout:
        pid = master_pid(cfg, prog)
        if pid and _answers(cfg.bind[0]):
            print(f"{prog}: started, PID {pid}, listening on {' '.join(cfg.bind)}")
            return OK
        seen = seen or pid is not None
        if pid is None and (seen or time.monotonic() - began > 10):
            break  # the master stopped (a worker failed to boot), or wrote no pid file
        time.sleep(0.2)
    print(f"{prog}: did not start; see {log_hint}", file=sys.stderr)
    return FAILED


def _answers(address, timeout=5):
    """Whether an HTTP request to ``address`` gets an answer, whatever its status."""
    try:
        if address.startswith("unix:"):
            conn = socket.socket(socket.AF_UNIX)
            conn.settimeout(timeout)
            conn.connect(util.parse_address(address))  # unix:PATH or unix://PATH
        else:
            host, _, port = address.rpartition(":")
            conn = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        with conn:
            # With Host, as any HTTP client asks (app.LocalhostOnUnixSocket
            # answers a request without one over a unix socket, too).
            conn.sendall(b"HEAD / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            return conn.recv(16).startswith(b"HTTP/")
    except (OSError, ValueError):  # ValueError: fd://N, not an address to connect to
        return False


def check(application, prog):
    """Load the application as a worker would, without serving; report in one line.

    Started as root for workers that run as gunicorn's ``user`` and
    ``group``, it loads the application as they do, as that user: what the
    workers may not open fails here too, and a database it creates is theirs
    (as root's, no worker could open it).
    """
    cfg = application.cfg
    as_user = ""
    if os.geteuid() == 0 and (cfg.uid, cfg.gid) != (os.geteuid(), os.getegid()):
        util.set_owner_process(cfg.uid, cfg.gid, initgroups=cfg.initgroups)
        as_user = f", as user {pwd.getpwuid(cfg.uid).pw_name}"
    for path in (cfg.pythonpath or "").split(","):
        if path and os.path.abspath(path) not in sys.path:
            sys.path.insert(0, os.path.abspath(path))
    try:
        application.wsgi()
    except AppImportError as exc:  # said in one line (a locked database, say)
        print(f"{prog}: the application does not load: {exc}", file=sys.stderr)
        return FAILED
    except Exception:
        traceback.print_exc()
        print(f"{prog}: the application does not load (see above)", file=sys.stderr)
        return FAILED
    finally:
        # Closed, a FileStorage writes its index; left open, the next start
        # would rebuild it from the whole Data.fs.
        database = getattr(sys.modules.get("Zope2"), "DB", None)
        if database is not None:
            database.close()
    print(f"{prog}: configuration and application OK{as_user}: {cfg.workers} workers "
          f"({cfg.worker_class_str}, {cfg.threads} threads), binds {' '.join(cfg.bind)}")
    return OK
