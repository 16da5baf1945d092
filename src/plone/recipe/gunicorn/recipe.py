"""The buildout recipe: a gunicorn part that serves a plone.recipe.zope2instance part.

``__init__`` reads and checks everything (nothing touches the disk), so a bad
option stops buildout before it uninstalls anything and the previous
installation keeps working.  ``install`` writes the files and the script and
returns every path it created.
"""

import logging
import os
import re
import shutil
import sys

import zc.buildout
import zc.buildout.easy_install
import zc.recipe.egg

from plone.recipe.gunicorn.instance import FALSE, LOG_LEVELS, TRUE, Instance

MODES = ("ini", "script")

# Options that belong to the recipe; every other option is a gunicorn setting.
RECIPE_OPTIONS = frozenset({
    "recipe", "instance", "mode", "script-name", "var", "eggs", "extra-paths",
    "find-links", "index", "initialization",
    "systemd-unit", "systemd-socket", "systemd-user", "systemd-group",
    "logrotate", "supervisor",
    # written by the recipe or by zc.recipe.egg, for other parts to read
    "location", "config-file", "script", "executable",
    "systemd-unit-file", "systemd-socket-file", "logrotate-file", "supervisor-file",
    "eggs-directory", "develop-eggs-directory", "_e", "_d", "_b",
})

# The handler of the part's logs where the instance writes its own with
# logging's FileHandler (its default) or WatchedFileHandler: one that also
# reopens a file that logrotate moved away, and never fails a request when it
# cannot (plone.recipe.gunicorn.logfile).
WATCHED = "plone.recipe.gunicorn.logfile.WatchedFileHandler"
PLAIN = ("", "FileHandler", "logging.FileHandler",
         "WatchedFileHandler", "handlers.WatchedFileHandler", "logging.handlers.WatchedFileHandler")
# Handlers that rotate their file themselves, each process on its own: not
# for a file that a master and its workers write (bin/instance is one process).
ROTATING = ("RotatingFileHandler", "TimedRotatingFileHandler")

# Filters the generated ini defines; other pipeline entries must be egg: URIs.
KNOWN_FILTERS = ("translogger", "zope")


class Recipe:
    def __init__(self, buildout, name, options):
        if sys.platform == "win32":
            raise zc.buildout.UserError(
                f"[{name}] gunicorn runs on POSIX systems only, not on Windows; "
                "serve Zope with waitress (bin/instance) there")
        # gunicorn does not import on Windows: only now is it safe to import.
        from plone.recipe.gunicorn import settings as gsettings

        self.buildout, self.name, self.options = buildout, name, options
        user_options = {k: v for k, v in options.items()
                        if k not in RECIPE_OPTIONS and not k.startswith("_")}

        options.setdefault("instance", "instance")
        options.setdefault("mode", "ini")
        options.setdefault("script-name", f"{name}-instance")
        self.instance = instance = Instance(buildout, name, options["instance"])
        options.setdefault("var", instance.var)

        self.mode = options["mode"].strip()
        if self.mode not in MODES:
            raise zc.buildout.UserError(
                f"[{name}] mode = {self.mode}: unknown mode; use ini (a PasteDeploy "
                "ini run by gunicorn) or script (gunicornapp.py and gunicorn.conf.py)")

        base = buildout["buildout"]
        self.location = options["location"] = os.path.join(base["parts-directory"], name)
        self.script = options["script"] = os.path.join(
            base["bin-directory"], options["script-name"])
        config_file = "gunicorn.ini" if self.mode == "ini" else "gunicorn.conf.py"
        options["config-file"] = os.path.join(self.location, config_file)

        var = options["var"]
        self.log_dir = os.path.join(var, "log")
        self.eventlog = os.path.join(self.log_dir, f"{name}.log")
        self.accesslog = os.path.join(self.log_dir, f"{name}-access.log")

        set_by_part = {gsettings.setting_name(option) for option in user_options}
        settings = self._settings(gsettings, user_options, self._defaults(gsettings, set_by_part))
        # Relative paths are the buildout's, wherever the server is started.
        self.settings = {setting: gsettings.absolute(setting, value, base["directory"])
                         for setting, value in settings.items()}
        self._own_logs()
        self.max_body = self._max_body()
        self.logs = self._logs()
        self._refuse_unsafe()
        self.pipeline = self._pipeline()
        self.service_files = self._service_files()
        # Eggs too: buildout removes a changed part before it installs it anew,
        # and a missing egg found only then would leave no script at all.
        self.working_set = self._working_set()
        if instance.zeo_client_client and self.settings["workers"] == 1:
            logging.getLogger(name).info(
                "one worker with %s threads: part [%s] sets zeo-client-client = %s, "
                "a ZEO cache file that one process may open; without it the "
                "default is %s workers", self.settings["threads"], instance.name,
                instance.zeo_client_client, shared_database_workers())
        if self.settings["workers"] > 1 and instance.sessions_in_memory(self.working_set):
            logging.getLogger(name).warning(
                "%s workers, and part [%s] keeps Zope's sessions in a temporary storage "
                "in each process's memory (zodb-temporary-storage): a session begun in "
                "one worker is empty in the others.  If nothing uses REQUEST.SESSION, "
                "set zodb-temporary-storage = off; else serve the temporary storage "
                "from ZEO, or use 1 worker", self.settings["workers"], instance.name)

    def _refuse_unsafe(self):
        """Never fork after opening a database; never two processes on a FileStorage."""
        from plone.recipe.gunicorn import preflight
        from gunicorn.config import Config

        cfg = Config()
        for name in ("preload_app", "workers"):
            if name in self.settings:
                cfg.set(name, self.settings[name])
        try:
            preflight.check_database_safety(cfg, self.instance.database)
        except preflight.Refused as refused:
            option = self._option_for("preload_app" if cfg.preload_app else "workers")
            raise zc.buildout.UserError(
                f"[{self.name}] {option} = {self.options[option].strip()!r}: {refused}"
                + ("" if cfg.preload_app else f" (part [{self.instance.name}])"))

    def _max_body(self):
        """The instance's ``max-request-body-size``: the largest request body
        the workers accept, as waitress does under ``bin/instance``."""
        value = self.instance.max_request_body_size.strip()
        if not value.isdigit():
            raise zc.buildout.UserError(
                f"[{self.instance.name}] max-request-body-size = {value!r}: not a whole "
                "number of bytes (the instance's default is 1073741824, 1 GiB)")
        return int(value)

    def _own_logs(self):
        """gunicorn's ``errorlog`` and ``accesslog``, given to the part, are
        the files it writes instead of ``var/log/<part>.log`` and
        ``-access.log`` (``-``: none; the event log is on stderr anyway, the
        access log goes to stdout)."""
        for setting in ("errorlog", "accesslog"):
            path = self.settings.get(setting, "-")
            if path == "-":
                continue
            problem = _not_writable(path) if path else "no file named"
            if problem:
                option = self._option_for(setting)
                raise zc.buildout.UserError(
                    f"[{self.name}] {option} = {self.options[option].strip()!r}: "
                    f"{problem}; name a file the server may write, or - for "
                    + ("stderr" if setting == "errorlog" else "stdout"))
        self.eventlog = self.settings.get("errorlog", self.eventlog)
        self.accesslog = self.settings.get("accesslog", self.accesslog)

    def _logs(self):
        """The part's logging, with the handlers and levels of the instance's
        logs, as plone.recipe.zope2instance writes them into ``wsgi.ini``,
        but into the part's own files (for ``render.logging_ini``).  A file
        the part names itself (``errorlog``, ``accesslog``) is written with
        the part's handler, as gunicorn would write it."""
        event, access = self.instance.log("event"), self.instance.log("access")
        if "errorlog" in self.settings:
            event_handler = None if self.eventlog == "-" else _watched(self.eventlog)
        else:
            event_handler = None if event.disabled else self._handler("event", event, self.eventlog)
        if "accesslog" in self.settings:
            access_handler = (("StreamHandler", "(sys.stdout,)", "{}") if self.accesslog == "-"
                              else _watched(self.accesslog))
        else:
            access_handler = self._handler("access", access, self.accesslog)
        return {
            "loglevel": self.settings["loglevel"],
            "event": event_handler,
            "access": access_handler,
            "access_level": "WARNING" if access.disabled else self._level("access", access).upper(),
        }

    def _level(self, kind, log):
        """gunicorn's name for the level of one of the instance's logs."""
        try:
            return LOG_LEVELS[log.level.upper()]
        except KeyError:
            raise zc.buildout.UserError(
                f"[{self.instance.name}] {kind}-log-level = {log.level!r}: not a logging "
                "level; write DEBUG, INFO, WARNING, ERROR or CRITICAL") from None

    def _handler(self, kind, log, path):
        """``(class, args, kwargs)`` of the handler writing ``path``, as the
        instance's handler writes its own file."""
        module, _, name = log.handler.rpartition(".")
        if name in ROTATING and module in ("", "handlers", "logging.handlers"):
            logging.getLogger(self.name).warning(
                "part [%s] sets %s-log-handler = %s: each process of the gunicorn part "
                "(the master and every worker) would rotate %s on its own, losing "
                "lines; the part writes it with WatchedFileHandler.  Rotate it with "
                "logrotate = true", self.instance.name, kind, log.handler, path)
            return _watched(path)
        handler = WATCHED if log.handler in PLAIN else log.handler
        try:
            args = log.args.format(path) if log.args else repr((path, "a"))
        except (IndexError, KeyError, ValueError):
            raise zc.buildout.UserError(
                f"[{self.instance.name}] {kind}-log-args = {log.args!r}: only {{}} may "
                "stand in braces, for the log file; write arguments like (r'{}', 'a')") from None
        return handler, args, log.kwargs or "{}"

    def _option_for(self, setting):
        from plone.recipe.gunicorn import settings as gsettings
        return next(k for k in self.options if gsettings.setting_name(k) == setting
                    and k not in RECIPE_OPTIONS)

    def _defaults(self, gsettings, set_by_part):
        """gunicorn settings for Zope where the part says nothing (option
        names).  The instance's ``http-address`` and ``threads`` are read only
        when the part does not set ``bind`` and ``threads`` itself."""
        name, instance, var = self.name, self.instance, self.options["var"]
        defaults = {}
        if "bind" not in set_by_part:
            try:
                defaults["bind"] = "\n".join(gsettings.bind_from_http_address(instance.http_address))
            except ValueError as exc:
                raise zc.buildout.UserError(
                    f"[{instance.name}] http-address = {instance.http_address!r}: {exc}"
                    f" (or give part [{name}] its own bind)")
        if "loglevel" not in set_by_part:
            # The instance's event-log-level: under gunicorn, loglevel sets it.
            defaults["loglevel"] = self._level("event", instance.log("event"))
        threads = 1
        if "threads" not in set_by_part:
            try:
                threads = int(instance.threads)
            except ValueError:
                threads = 0
            if threads < 1:
                raise zc.buildout.UserError(
                    f"[{instance.name}] threads = {instance.threads!r}: not a whole number "
                    "of 1 or more")
        if instance.shares_database and not instance.zeo_client_client:
            # ZEO, RelStorage: single-threaded (sync) workers, one per core and
            # one more.  Zope is CPU-bound: processes share no GIL, and the
            # kernel gives each new connection to a free worker.  gthread
            # threads cost Zope more CPU per request, and a kept-alive
            # connection stays with the worker that accepted it, so one worker
            # may get all the load.  The extra worker answers fast requests
            # while a slow one holds another.  (docs/benchmarks.rst)
            workers, threads = shared_database_workers(), 1
        else:
            # A FileStorage belongs to one process, and so does a ZEO cache
            # file (zeo-client-client): the instance's threads give it
            # concurrency, as they give waitress.
            workers = 1
        return {
            **defaults,
            "control-socket": os.path.join(var, f"{name}.ctl"),
            "forwarded-allow-ips": "127.0.0.1,::1",
            "pidfile": os.path.join(var, f"{name}.pid"),
            "proc-name": name,
            "threads": str(threads),
            "worker-class": gsettings.SYNC_WORKER,  # with threads: _settings
            "workers": str(workers),
            # A sync worker still busy with one request after this many seconds
            # is killed: gunicorn's 30 s would cut long ZMI operations short.
            "timeout": "300",
        }

    def _settings(self, gsettings, user_options, defaults):
        """Every gunicorn setting of the part, checked by gunicorn: {name: value}."""
        given = {}
        for option in user_options:
            try:
                setting = gsettings.check_name(option)
            except gsettings.SettingError as exc:
                raise zc.buildout.UserError(f"[{self.name}] {option}: {exc.reason}")
            if setting in given:
                first, second = sorted([option, given[setting]])
                raise zc.buildout.UserError(
                    f"[{self.name}] {first} and {second} both set gunicorn's "
                    f"{setting}; keep one of them")
            given[setting] = option
        for option, value in defaults.items():
            if gsettings.setting_name(option) not in given:
                self.options.setdefault(option, value)
                given[gsettings.setting_name(option)] = option

        result = {}
        for setting, option in given.items():
            value = self.options[option]
            try:
                result[setting] = gsettings.convert(option, value)
            except gsettings.SettingError as exc:
                raise zc.buildout.UserError(
                    f"[{self.name}] {option} = {value.strip()!r}: {exc.reason}")
        for setting, (good, right) in gsettings.STRICTER.items():
            if setting in result and not good(result[setting]):
                option = given[setting]
                raise zc.buildout.UserError(
                    f"[{self.name}] {option} = {self.options[option].strip()!r}: {right}")
        # The threads as finally set, the instance's or the part's, decide.
        worker = gsettings.worker_for(result["worker_class"], result["threads"])
        if worker != result["worker_class"]:
            result["worker_class"] = self.options[given["worker_class"]] = worker
        if "bind" in user_options or "bind" in given.values():
            for address in result["bind"]:
                try:
                    gsettings.check_bind(address)
                except ValueError as exc:
                    raise zc.buildout.UserError(
                        f"[{self.name}] {given['bind']} = {self.options[given['bind']]!r}: {exc}")
        return result

    def _service_files(self):
        """The optional files that run the part as a service: {option: file name}.

        Their paths become options (``systemd-unit-file`` ...) for other parts.
        """
        from gunicorn.config import Config
        from plone.recipe.gunicorn import render

        name, options = self.name, self.options
        unit, socket, logrotate, supervisor = (
            _switch(name, options, option)
            for option in ("systemd-unit", "systemd-socket", "logrotate", "supervisor"))
        self.systemd_user = _account(name, options, "systemd-user")
        self.systemd_group = _account(name, options, "systemd-group")
        for option, value in (("systemd-socket", socket), ("systemd-user", self.systemd_user),
                              ("systemd-group", self.systemd_group)):
            if value and not unit:
                raise zc.buildout.UserError(
                    f"[{name}] {option} = {options[option].strip()!r}: it belongs to the "
                    "systemd unit; set systemd-unit = true too")
        if (unit or supervisor) and self.settings.get("daemon"):
            option = self._option_for("daemon")
            manager = "systemd" if unit else "supervisor"
            raise zc.buildout.UserError(
                f"[{name}] {option} = {options[option].strip()!r}: {manager} runs the "
                "server in the foreground, and a server that daemonizes looks to it as if "
                "it had exited; set daemon = false (bin/<part>-instance start "
                "daemonizes by itself)")
        if logrotate and self.eventlog == self.accesslog == "-":
            raise zc.buildout.UserError(
                f"[{name}] logrotate = {options['logrotate'].strip()!r}: the part writes "
                "no log file to rotate (errorlog and accesslog are -)")
        if logrotate and not self.settings.get("pidfile"):
            raise zc.buildout.UserError(
                f"[{name}] logrotate = {options['logrotate'].strip()!r}: the rotation "
                "signals the server through its pid file; give pidfile a path")

        self.graceful_timeout = self.settings.get("graceful_timeout", Config().graceful_timeout)
        self.listen = []
        if socket:
            try:
                self.listen = render.listen_streams(self.settings["bind"])
            except ValueError as exc:
                raise zc.buildout.UserError(
                    f"[{name}] systemd-socket = {options['systemd-socket'].strip()!r}: {exc}")

        files = {}
        if unit:
            files["systemd-unit"] = f"{name}.service"
        if socket:
            files["systemd-socket"] = f"{name}.socket"
        if logrotate:
            files["logrotate"] = "logrotate.conf"
        if supervisor:
            files["supervisor"] = "supervisor.conf"
        for option, filename in files.items():
            options[f"{option}-file"] = os.path.join(self.location, filename)
        return files

    def _pipeline(self):
        pipeline = list(self.instance.pipeline)
        for entry in pipeline:
            if (entry not in KNOWN_FILTERS and entry not in self.instance.filters
                    and not entry.startswith("egg:")):
                raise zc.buildout.UserError(
                    f"[{self.instance.name}] pipeline: {entry!r} is a filter section of "
                    "the instance's own wsgi.ini, which the gunicorn ini does not have; "
                    "name it as egg:DISTRIBUTION#ENTRY_POINT")
        if self.mode == "script" and self.instance.filters:
            option = {"sentry": "sentry_dsn", "profile": "profile"}[next(iter(self.instance.filters))]
            raise zc.buildout.UserError(
                f"[{self.name}] mode = script: part [{self.instance.name}] sets {option}, "
                "whose filter takes settings that only an ini can give it; use mode = ini")
        if self.mode == "script" or "access_log_format" in self.settings:
            # gunicorn's access log takes the translogger's place: script mode
            # has no ini for it, and a format of the part's is gunicorn's.
            pipeline = [entry for entry in pipeline if entry != "translogger"]
        if "zope" not in pipeline:
            pipeline.append("zope")
        return pipeline

    # -- install ---------------------------------------------------------

    def install(self):
        from plone.recipe.gunicorn import render
        from plone.recipe.gunicorn import settings as gsettings

        context = {
            "part": self.name,
            "instance": self.instance.name,
            "script": self.options["script-name"],
            "location": self.location,
            "zope_conf": self.instance.zope_conf,
            "eventlog": self.eventlog,
            "accesslog": self.accesslog,
            "logs": self.logs,
            "logconfig": os.path.join(self.location, "logging.ini"),
            "max_request_body_size": str(self.max_body),
        }
        if self.mode == "ini":
            context["shared_database"] = "true" if self.instance.shares_database else "false"
            context["zeo_client_client"] = self.instance.zeo_client_client
            rendered = render.ini_mode(context, self.settings, self.pipeline,
                                       self.instance.filters)
        else:
            server_settings = dict(self.settings)
            user_config = server_settings.pop("config", None)
            rendered = render.script_mode(context, server_settings, self.pipeline, user_config)

        service = dict(
            context,
            script_path=self.script,
            directory=self.buildout["buildout"]["directory"],
            var=self.options["var"],
            pidfile=self.settings.get("pidfile"),
            graceful_timeout=self.graceful_timeout,
        )
        if "systemd-unit" in self.service_files:
            rendered.update(render.systemd_unit(
                service, self.listen, self.systemd_user, self.systemd_group,
                ipv6_only=bool(gsettings.ipv6_only(gsettings.parse_binds(self.settings["bind"])))))
        if "logrotate" in self.service_files:
            rendered.update(render.logrotate(service))
        if "supervisor" in self.service_files:
            rendered.update(render.supervisor(service))
        service_paths = [self.options[f"{option}-file"] for option in self.service_files]

        created_location = not os.path.isdir(self.location)
        try:
            os.makedirs(self.location, exist_ok=True)
            for directory in {self.log_dir, *(os.path.dirname(path) for path in
                                              (self.eventlog, self.accesslog) if path != "-")}:
                os.makedirs(directory, exist_ok=True)
            for filename, text in rendered.items():
                _write(os.path.join(self.location, filename), text)
            scripts = self._scripts(self.working_set)
        except BaseException:
            if created_location:
                shutil.rmtree(self.location, ignore_errors=True)
            raise
        return [self.location, *service_paths, *scripts]

    update = install

    def _working_set(self):
        """The instance's working set (what plone.recipe.zope2instance itself
        uses, so ZEO, RelStorage and the instance's eggs are importable) plus
        this recipe and gunicorn, plus the part's own ``eggs``, found through
        the part's ``find-links`` and ``index``, else the instance's, else
        ``[buildout]``'s."""
        options = {"eggs": "\n".join([self.instance.eggs, self.options.get("eggs", "")])}
        for option in ("find-links", "index"):
            value = self.options.get(option, self.instance.options.get(option))
            if value is not None:
                options[option] = value
        egg = zc.recipe.egg.Egg(self.buildout, self.name, options)
        return egg.working_set(["plone.recipe.zope2instance", "plone.recipe.gunicorn"])[1]

    def _scripts(self, working_set):
        """``bin/<part>-instance``: as ``bin/instance``, with the instance's
        ``extra-paths`` and ``initialization`` code, then the part's own."""
        extra_paths = (self.instance.extra_paths + "\n" + self.options.get("extra-paths", "")).split()
        initialization = "\n".join(code for code in (
            self.instance.options.get("initialization", "").strip(),
            self.options.get("initialization", "").strip()) if code)
        return zc.buildout.easy_install.scripts(
            [(self.options["script-name"], "plone.recipe.gunicorn.runtime", "main")],
            working_set,
            self.buildout["buildout"]["executable"],
            self.buildout["buildout"]["bin-directory"],
            extra_paths=extra_paths,
            initialization=initialization,
            arguments=(f"{self.mode!r}, {self.options['config-file']!r}, "
                       f"shared_database={self.instance.shares_database!r}"
                       + (f", zeo_client_client={self.instance.zeo_client_client!r}"
                          if self.instance.zeo_client_client else "")),
        )


def shared_database_workers():
    """The default workers on a shared database: one per core and one more."""
    return (os.cpu_count() or 1) + 1


def _watched(path):
    """``(class, args, kwargs)`` of the part's own handler for the file ``path``."""
    return WATCHED, repr((path, "a")), "{}"


def _not_writable(path):
    """Why the server could not write the log file ``path``, or ''."""
    if os.path.isdir(path):
        return "a directory, not a file"
    if os.path.exists(path):
        return "" if os.access(path, os.W_OK) else "the file is not writable"
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        if os.path.exists(parent):
            return f"{parent} is not a directory"
        parent = os.path.dirname(parent)
    return "" if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def _switch(part, options, option):
    """A true/false option (also on/off, yes/no, 1/0); false when not given."""
    value = options.get(option, "").strip()
    if value.lower() in TRUE:
        return True
    if not value or value.lower() in FALSE:
        return False
    raise zc.buildout.UserError(
        f"[{part}] {option} = {value!r}: not a switch; write true or false (or on, off)")


_ACCOUNT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\$?")


def _account(part, options, option):
    """A user or group name for the systemd unit, or ''."""
    value = options.get(option, "").strip()
    if value and not _ACCOUNT.fullmatch(value):
        raise zc.buildout.UserError(
            f"[{part}] {option} = {value!r}: not a user or group name; write one "
            "name, like plone, or a number")
    return value


def _write(path, text):
    """Write ``text`` to ``path`` unless it is there already; never writable by others."""
    try:
        with open(path) as existing:
            if existing.read() == text:
                return
    except FileNotFoundError:
        pass
    tmp = path + ".tmp"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "w") as f:
        f.write(text)
    os.replace(tmp, path)
