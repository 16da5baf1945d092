"""Run time: what ``bin/<part>-instance`` and the PasteDeploy server entry point do.

In both modes this process becomes the gunicorn master, so gunicorn's signals
(HUP, TERM, INT, QUIT, TTIN, TTOU, USR1, USR2) reach it directly, and the Zope
application is loaded by each worker after the fork (``preload_app`` off).
The master is gunicorn's with the database rules kept after the start
(``ZopeArbiter``).

- ini mode: the ini's ``[server:main]`` holds the gunicorn settings and its
  ``main`` pipeline is the application.  gunicorn's own ``--paste`` loads the
  application per worker but ignores ``[server:main]``; ``PasteApplication``
  reads it.
- script mode: gunicorn's own command line with ``-c gunicorn.conf.py``; that
  file names ``gunicornapp:application``.

Extra command-line arguments go to gunicorn and override the generated
settings (gunicorn's precedence: file, then GUNICORN_CMD_ARGS, then command
line).
"""

import ast
import configparser
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time

from gunicorn import glogging
from gunicorn import sock as gunicorn_sock
from gunicorn.app.base import BaseApplication
from gunicorn.app.pasterapp import has_logging_config
from gunicorn.app.wsgiapp import WSGIApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import AppImportError
from gunicorn.instrument.statsd import Statsd

from plone.recipe.gunicorn import control, logfile, preflight, render, settings


def main(mode, config, argv=None, shared_database=None, prog=None, zeo_client_client=None):
    """Entry point of ``bin/<part>-instance [VERB] [gunicorn options]``.

    ``shared_database`` is False for a FileStorage instance (one process
    only), True for ZEO or RelStorage, None when unknown;
    ``zeo_client_client`` the instance's option (one process only, too).
    """
    database = preflight.Database(shared_database, zeo_client_client)
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0])
    verb, args = control.split_verb(argv)
    if verb == "debug":
        os.environ[control.DEBUG_ENV] = "1"
    application = make_application(
        mode, config, control.gunicorn_args(verb, args), prog, database)
    cfg = application.cfg

    if verb == "status":
        sys.exit(control.status(cfg, prog))
    if verb == "stop":
        sys.exit(control.stop(cfg, prog))
    if verb == "reload":
        sys.exit(control.reload(cfg, prog))
    if verb == "restart":
        if control.stop(cfg, prog) != control.OK:
            sys.exit(control.FAILED)
        application = make_application(
            mode, config, control.gunicorn_args("start", args), prog, database)
        verb, cfg = "start", application.cfg
    if verb == "start" and (pid := control.master_pid(cfg, prog)):
        print(f"{prog}: already running as PID {pid}")
        sys.exit(control.OK)  # LSB: starting a running service succeeds
    try:
        preflight.check_database_safety(cfg, database)
        if verb == "check" or cfg.check_config or cfg.print_config:
            # gunicorn's --check-config and --print-config load the
            # application too: here as ``check`` loads it, with script mode's
            # pythonpath, and closing the database after.
            if cfg.print_config:
                print(cfg)
            sys.exit(control.check(application, prog))
        preflight.check_pidfile(cfg, prog)
        preflight.check_binds(cfg)
        preflight.check_syslog(cfg)
    except preflight.Refused as refused:
        sys.exit(f"{prog}: {refused}")
    if verb == "start":
        sys.exit(control.start(application, prog, log_hint=_log_hint(cfg)))
    try:
        application.run()
    except Exception as exc:
        # gunicorn reports most start-up problems itself; the rest (a log
        # directory that is gone, say) would otherwise end in a traceback.
        sys.exit(f"{prog}: cannot start: {exc}")


def make_application(mode, config, args, prog, database=None):
    """The gunicorn application for a mode; reads the configuration, loads nothing."""
    # gunicorn parses sys.argv, and a USR2 runs it again: the script's path first.
    script = os.path.abspath(sys.argv[0]) if os.path.isfile(sys.argv[0]) else prog
    if mode == "ini":
        application_class = PasteApplication
    elif mode == "script":
        application_class = ScriptApplication
    else:
        sys.exit(f"{prog}: unknown mode {mode!r}; expected ini or script")
    sys.argv = [script, "-c", config, *args]
    return application_class(config, prog=prog, database=database or preflight.Database())


class ZopeDefaults:
    """Defaults of the recipe's applications, set anew at every (re)load of the
    configuration; the configuration itself may still override them."""

    def load(self):
        # In a worker, before Zope loads: a worker whose master has gone
        # goes too.  gunicorn's workers look for their master only between
        # requests, and one still loading Zope, waiting for a ZEO server that
        # is down, would keep the port and the database for a long time.
        # (A master that gets TERM while its workers load, and then sees one
        # fail to boot, exits at once.)
        die_with_parent()
        if not self.serving:  # check, in the foreground, says what fails itself
            return super().load()
        # Nor does TERM, gunicorn's graceful stop, wait for a worker that is
        # still loading Zope: it serves no request yet.  The master sends it
        # when it stops, and when it halts because another worker failed to
        # boot; gunicorn's worker would finish its wait for the ZEO server
        # (30 s) before it looked.  QUIT and INT end a worker at once anyway.
        serving_handler = signal.signal(signal.SIGTERM, stop_loading)
        try:
            return super().load()
        except AppImportError as exc:  # a reason in one line (app.make_zope_app)
            # gunicorn would print it on stderr only, which a daemon (the
            # start verb) has closed: the log says why, then the worker exits
            # as gunicorn's would, and the master stops ("App failed to load").
            log = logging.getLogger("gunicorn.error")
            log.error("%s", exc)
            log.debug("Exception while loading the application", exc_info=True)
            sys.exit(Arbiter.APP_LOAD_ERROR)
        finally:
            signal.signal(signal.SIGTERM, serving_handler)

    def load_default_config(self):
        super().load_default_config()
        self.cfg.set("logger_class", Logger)

    def load_config(self):
        super().load_config()
        # ``--threads 4`` on the command line: gunicorn would swap the
        # recipe's sync worker for its own gthread worker.
        self.cfg.set("worker_class", settings.worker_for(
            self.cfg.settings["worker_class"].get(), self.cfg.threads))
        # gunicorn switches its default logger to its statsd one when
        # statsd_host is set; the recipe's logger gets the same.
        if self.cfg.settings["logger_class"].get() is Logger and self.cfg.statsd_host:
            self.cfg.set("logger_class", StatsdLogger)


class Logger(glogging.Logger):
    """gunicorn's logger, whose ``loglevel`` also rules the logging configuration
    the recipe writes (Zope's event log): ``--log-level debug`` works.  A
    ``logconfig`` of the user's own keeps the levels it gives.

    In ini mode the pipeline's translogger writes the access log, as under
    ``bin/instance``, and the configuration silences ``gunicorn.access``
    (unless the part sets ``access_log_format``).
    gunicorn would still build every request's log fields (all headers and
    the environ) and then drop the message: a few per cent of a Zope
    request.  When that logger would drop the message, they are not built.
    """

    def setup(self, cfg):
        super().setup(cfg)
        level = self.LOG_LEVELS.get(cfg.loglevel.lower(), logging.INFO)
        if written_by_recipe(cfg.logconfig):
            logging.getLogger().setLevel(level)
            self._log_where_settings_say(cfg)
        logfile.give_logs_to(cfg.uid, cfg.gid)  # gunicorn's user and group
        self.error_log.setLevel(level)
        if (cfg.access_log_format != cfg.settings["access_log_format"].default
                and not self.access_log.isEnabledFor(logging.INFO)
                and logging.getLogger("wsgi").isEnabledFor(logging.INFO)):
            self.warning("access_log_format is not used: the pipeline's translogger writes "
                         "the access log; give the buildout part access-log-format instead")

    def _log_where_settings_say(self, cfg):
        """gunicorn's ``errorlog``, ``accesslog`` and ``syslog``, on the command
        line or in the part, applied to the recipe's logging configuration,
        which gunicorn lets replace them: Zope's event log goes where
        gunicorn's error log would, the access log (the translogger's in ini
        mode) where gunicorn's would.  A reload (HUP) reads the
        configuration anew, so nothing is added twice."""
        root = logging.getLogger()
        access = [logging.getLogger("wsgi"), self.access_log]
        if cfg.errorlog != "-":  # "-", the default, is stderr: the console handler
            _write_to("eventlog", cfg.errorlog, None, [root])
            if cfg.capture_output:  # stderr is that file now
                for console in [h for h in root.handlers if h.name == "console"]:
                    root.removeHandler(console)
        if cfg.accesslog is not None:
            _write_to("accesslog", cfg.accesslog, sys.stdout, access)
        if cfg.syslog:
            self._set_syslog_handler(root, cfg, self.syslog_fmt, "error")
            if not cfg.disable_redirect_access_to_syslog:
                for log in access:
                    self._set_syslog_handler(log, cfg, self.syslog_fmt, "access")

    def _set_syslog_handler(self, log, cfg, fmt, name):
        """gunicorn's, with the recipe's handler, which outlives a restart of
        the syslog daemon (``logfile.SysLogHandler``)."""
        prefix = cfg.syslog_prefix or cfg.proc_name.replace(":", ".")
        try:
            facility = glogging.SYSLOG_FACILITIES[cfg.syslog_facility.lower()]
        except KeyError as exc:
            raise RuntimeError("unknown facility name") from exc
        socktype, address = glogging.parse_syslog_address(cfg.syslog_addr)
        handler = logfile.SysLogHandler(address=address, facility=facility, socktype=socktype)
        handler.setFormatter(logging.Formatter(f"gunicorn.{prefix}.{name}: {fmt}"))
        handler._gunicorn = True  # gunicorn's own: replaced when it sets up anew (HUP)
        log.addHandler(handler)

    def access(self, resp, req, environ, request_time):
        if self.access_log.isEnabledFor(logging.INFO):
            super().access(resp, req, environ, request_time)

    def reopen_files(self):
        """USR1, after a rotation: gunicorn's reopening, except that the
        recipe's handlers open their files anew their own way, which cannot
        fail (in a worker that runs as gunicorn's ``user``, the master may
        not yet have given it the new file).  gunicorn's reopening passes
        over a handler without a stream: the recipe's handlers hide theirs
        from it meanwhile."""
        ours = [h for h in logfile.file_handlers() if isinstance(h, logfile.WatchedFileHandler)]
        with contextlib.ExitStack() as held:
            for handler in ours:
                held.enter_context(handler.lock)
                handler.reopen()
                held.callback(setattr, handler, "stream", handler.stream)
                handler.stream = None
            super().reopen_files()


class StatsdLogger(Logger, Statsd):
    """The recipe's logger, sending gunicorn's statsd metrics (``statsd-host``)."""

    def access(self, resp, req, environ, request_time):
        # gunicorn's statsd logger counts requests where it logs them: always.
        Statsd.access(self, resp, req, environ, request_time)


def _write_to(name, destination, stream, loggers):
    """Have the handler ``name`` of the recipe's logging configuration write to
    the file ``destination`` (``-``: to ``stream``) for ``loggers``, with its
    level and format.  A handler that writes there already (the part named
    the file) is kept."""
    old = next((h for log in loggers for h in log.handlers if h.name == name), None)
    if old is not None and _writes_to(old, destination, stream):
        return
    if old is not None:
        for log in loggers:
            log.removeHandler(old)
        old.close()
    new = (logging.StreamHandler(stream) if destination == "-"
           else logfile.WatchedFileHandler(destination))
    new.name = name
    # With the instance's event log disabled there is none: like the console.
    model = old if old is not None else next(
        (h for h in logging.getLogger().handlers if h.name == "console"), None)
    if model is not None:
        new.setLevel(model.level)
        new.setFormatter(model.formatter)
    for log in loggers:
        log.addHandler(new)


def _writes_to(handler, destination, stream):
    """Whether a logging handler writes to the file ``destination`` (``-``: ``stream``)."""
    if destination == "-":
        return getattr(handler, "stream", None) is stream
    return getattr(handler, "baseFilename", None) == os.path.abspath(destination)


def written_by_recipe(logconfig):
    """Whether a logging configuration file is one the recipe wrote."""
    try:
        with open(logconfig) as config:
            return config.readline().startswith(render.GENERATED)
    except (OSError, TypeError, UnicodeDecodeError):  # TypeError: no logconfig
        return False


def stop_loading(signum, frame):
    """SIGTERM while Zope loads: exit at once, with nothing in flight to
    finish.  The kernel releases the start-up lock (a POSIX lock) and the
    database connection (the server aborts a transaction left open).  An
    exception raised here instead can land in a weakref callback or a
    ``__del__``, where Python prints and drops it, and the worker loaded on
    (seen: it waited 30 s more for a ZEO server that was down)."""
    os._exit(0)


def die_with_parent():
    """Have the kernel kill this process when its parent exits (Linux)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _log_hint(cfg):
    """Where a daemon's start-up errors end up: the recipe's event log, if any."""
    if cfg.errorlog != "-":
        return cfg.errorlog
    if cfg.logconfig:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(cfg.logconfig)
        try:  # the recipe's logging configuration; a user's may differ
            return ast.literal_eval(parser["handler_eventlog"]["args"])[0]
        except (KeyError, ValueError, SyntaxError, TypeError, IndexError):
            pass
    return "the server's log"


class ZopeMaster(BaseApplication):
    """Runs the recipe's master instead of gunicorn's.

    It comes after gunicorn's ``Application`` in the method resolution order
    of the recipe's applications: gunicorn's ``run()`` (daemon, python path)
    ends with ``super().run()``, which is this one.
    """

    database = None  # a preflight.Database, as make_application was told
    serving = False  # True in the master and its workers; False for check

    def run(self):
        self.serving = True
        # gunicorn looks its IPv6 listener class up by this name when it binds
        # (at the start, after a HUP, and in workers with reuse_port).
        gunicorn_sock.TCP6Socket = TCP6Socket
        try:  # as gunicorn's BaseApplication.run, with the recipe's arbiter
            ZopeArbiter(self, self.database).run()
        except RuntimeError as exc:  # gunicorn's "cannot start", in one line
            sys.exit(f"Error: {exc}")


class ZopeArbiter(Arbiter):
    """gunicorn's master, which keeps the database safe after the start too.

    ``main()`` refuses an unsafe configuration before the start.  Later a
    ``HUP`` reads the configuration files again, and ``TTIN`` or the control
    socket's ``worker add`` ask for more workers: the same rules hold then,
    and what breaks them is logged and not done.  On a FileStorage (or with
    a persistent ZEO cache) a ``HUP`` stops the worker (its requests in
    flight finish) before it starts the new one, which could not open the
    file while the old one holds it: requests meanwhile wait in the listen
    queue.
    """

    def __init__(self, app, database):
        self.database = database
        super().__init__(app)

    def setup(self, app):
        # At the start, and after every HUP has read the configuration again.
        refused = None
        try:
            preflight.check_database_safety(app.cfg, self.database)
        except preflight.Refused as exc:
            refused = exc
            app.cfg.set("preload_app", False)
            if self.database.one_process:
                app.cfg.set("workers", 1)
        super().setup(app)
        if refused:
            self.log.error("Configuration not applied: %s; running without "
                           "preload_app and with %s workers", refused, self.cfg.workers)

    def reexec(self):
        if self.database.one_process:
            self.log.error("USR2 ignored: the new master's worker could not open "
                           "%s, which the running worker holds; use HUP to reload",
                           self.database.one_process)
            return
        super().reexec()

    def reload(self):
        if self.database.one_process:
            self.log.info("One process may open %s: stopping the worker before "
                          "starting its replacement", self.database.one_process)
            self.stop_workers()
        super().reload()

    def manage_workers(self):
        if self.database.one_process and self.num_workers > 1:
            self.log.error("%s workers asked for, but one process may open %s; "
                           "keeping 1", self.num_workers, self.database.one_process)
            self.num_workers = 1
        super().manage_workers()

    def stop_workers(self):
        """Stop every worker as gunicorn's ``stop()`` does, still listening."""
        for signum, seconds in ((signal.SIGTERM, self.cfg.graceful_timeout), (signal.SIGKILL, 10)):
            self.kill_workers(signum)
            deadline = time.monotonic() + seconds
            while self.WORKERS and time.monotonic() < deadline:
                self.reap_workers()
                time.sleep(0.1)


class TCP6Socket(gunicorn_sock.TCP6Socket):
    """gunicorn's IPv6 listener, IPv6 only on ``[::]`` when an IPv4 bind has
    its port (``settings.ipv6_only``), as waitress makes it: then
    ``0.0.0.0:8080 [::]:8080`` binds, as under ``bin/instance``."""

    def set_options(self, sock, bound=False):
        if not bound and self.cfg_addr in settings.ipv6_only(self.conf.address):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        return super().set_options(sock, bound=bound)


class PartConfig:
    """The part's configuration, read first and always.

    ``make_application`` names the part's file with ``-c``, so gunicorn
    never looks for a ``gunicorn.conf.py`` in whatever directory the server
    is started from; a ``-c FILE`` on the command line replaces that
    argument, and is read after the part's configuration, not instead of it.
    """

    def __init__(self, config, prog=None, database=None):
        self.config = os.path.abspath(config)
        self.database = database  # for ZopeMaster
        super().__init__("%(prog)s [VERB] [OPTIONS]", prog=prog)

    def load_config_from_file(self, filename):
        self.load_part_config()
        if os.path.abspath(filename) == self.config:
            # gunicorn reads a -c FILE in GUNICORN_CMD_ARGS when the command
            # line has none; here the part's file stands in for that.
            env = self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env())
            filename = env.config
        if filename and os.path.abspath(filename) != self.config:
            return super().load_config_from_file(filename)

    def load_part_config(self):
        """Read the part's files, with ``WSGIApplication.load_config_from_file``
        (gunicorn's, not the method above)."""
        raise NotImplementedError


class ScriptApplication(PartConfig, ZopeDefaults, WSGIApplication, ZopeMaster):
    """gunicorn's command line, with the recipe's ``gunicorn.conf.py``."""

    def load_part_config(self):
        WSGIApplication.load_config_from_file(self, self.config)


class PasteApplication(PartConfig, ZopeDefaults, WSGIApplication, ZopeMaster):
    """gunicorn serving a PasteDeploy ini, settings from its ``[server:main]``."""

    def init(self, parser, opts, args):
        if not os.path.exists(self.config):
            raise RuntimeError(f"{self.config} not found; run buildout")
        # WSGIApplication.load() then calls PasteDeploy's loadapp, per worker.
        self.cfg.set("paste", self.config)
        self.cfg.set("default_proc_name", self.config)
        self.app_uri = "config:" + self.config
        if has_logging_config(self.config):
            self.cfg.set("logconfig", self.config)

    def load_part_config(self):
        server = server_settings(self.config)
        user_config = server.pop("config", None)
        for name, value in server.items():
            self.cfg.set(name, value)
        # A config file named in [server:main] (the part's config option) is
        # read after the block, so its settings win, as in script mode, where
        # gunicorn.conf.py runs it last.  (gunicorn's own paste runner reads
        # it first.)
        if user_config:
            WSGIApplication.load_config_from_file(self, user_config)


def server_settings(ini, section="server:main"):
    """The gunicorn settings written in an ini's ``[server:main]``, converted
    (``%%`` is ``%``, as PasteDeploy reads it)."""
    parser = configparser.ConfigParser()
    parser.read(ini)
    return {
        settings.setting_name(key): settings.convert(key, value)
        for key, value in parser.items(section)
        if key not in ("use", "shared_database", "zeo_client_client")  # read by serve()
    }


def serve(app, global_conf, **local_conf):
    """PasteDeploy server runner: ``use = egg:plone.recipe.gunicorn#main``.

    Reached when ``bin/instance fg|console`` runs our ini (the instance's
    ``wsgi`` option).  Zope's runwsgi has already created the application in
    this process, and with it opened the database: forking workers from here
    would share that connection.  So this process is replaced by a fresh
    gunicorn master for the same ini, whose workers create their own.
    """
    ini = os.path.abspath(global_conf["__file__"])
    path = os.pathsep.join(entry for entry in sys.path if entry)
    env = dict(os.environ, PYTHONPATH=path)
    shared = {"true": "True", "false": "False"}.get(local_conf.get("shared_database"), "None")
    client = local_conf.get("zeo_client_client", "").strip() or None
    code = ("import sys; from plone.recipe.gunicorn.runtime import main; "
            f"main('ini', sys.argv[1], [], shared_database={shared}, prog=sys.argv[2], "
            f"zeo_client_client={client!r})")
    sys.stdout.flush()
    sys.stderr.flush()
    prog = os.path.basename(sys.argv[0])
    os.execve(sys.executable, [sys.executable, "-c", code, ini, prog], env)
