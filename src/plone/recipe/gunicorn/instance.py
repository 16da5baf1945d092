"""What a plone.recipe.zope2instance part tells us, read the way that recipe reads it.

The gunicorn part serves the instance's Zope: its ``zope.conf``, its eggs,
its ``http-address`` and ``threads``, its filter pipeline, and whether its
database is shared with other processes (ZEO or RelStorage client).
"""

import os
import re
from typing import NamedTuple

import zc.buildout

INSTANCE_RECIPES = ("plone.recipe.zope2instance",)
DEFAULT_PIPELINE = "translogger\negg:Zope#httpexceptions\nzope"

# Switches, written as plone.recipe.zope2instance reads its own (zeo-client);
# the recipe reads its own switches the same way.
TRUE = ("on", "true", "yes", "1")
FALSE = ("off", "false", "no", "0")


# Python's logging levels as a logging configuration file names them (the
# instance writes its event-log-level and access-log-level into wsgi.ini),
# with gunicorn's name for each.
LOG_LEVELS = {"CRITICAL": "critical", "FATAL": "critical", "ERROR": "error",
              "WARNING": "warning", "WARN": "warning", "INFO": "info",
              "DEBUG": "debug", "NOTSET": "debug"}


class Log(NamedTuple):
    """One of the instance's two logs, as its options set it up in wsgi.ini:
    ``event-log`` or ``access-log`` (``z2-log``), then ``-level``,
    ``-handler``, ``-args`` (``{}`` stands for the file) and ``-kwargs``."""

    disabled: bool
    level: str  # the option's value, as given
    handler: str  # a logging handler class; '' for the instance's FileHandler
    args: str  # '' for (the file, 'a')
    kwargs: str  # '' for {}


class Instance:
    """One plone.recipe.zope2instance part, seen from another part."""

    def __init__(self, buildout, part, name):
        if name not in buildout:
            raise zc.buildout.UserError(
                f"[{part}] instance = {name}: there is no part [{name}] in this "
                "buildout; name the plone.recipe.zope2instance part to serve")
        # Looking the section up makes buildout install that part before ours.
        self.options = options = buildout[name]
        # "name", "name:entry", or a requirement: "name >= 6.0"
        recipe = re.split(r"[\s:<>=!~\[;]", options.get("recipe", "").strip(), maxsplit=1)[0]
        if recipe not in INSTANCE_RECIPES:
            raise zc.buildout.UserError(
                f"[{part}] instance = {name}: part [{name}] uses recipe "
                f"{recipe or '(none)'!r}, not plone.recipe.zope2instance; name "
                "a plone.recipe.zope2instance part")
        self.name = name
        directory = buildout["buildout"]["directory"]
        self.location = options.get("location") or os.path.join(
            buildout["buildout"]["parts-directory"], name)
        self.zope_conf = options.get("zope-conf") or os.path.join(
            self.location, "etc", "zope.conf")
        self.var = options.get("var") or os.path.join(directory, "var")
        self.http_address = options.get("http-address", "0.0.0.0:8080")
        self.threads = options.get("threads", "4")
        # waitress's limit under bin/instance; 1 GiB is the instance's default
        self.max_request_body_size = options.get("max-request-body-size", "1073741824")
        self.eggs = options.get("eggs", "")
        self.extra_paths = options.get("extra-paths", "")
        self.pipeline, self.filters = self._pipeline(name, options)
        # A ZEO client cache in a file that one process may open (locked);
        # the instance writes it into zope.conf only for a ZEO client.
        self.zeo_client_client = (
            options.get("zeo-client-client", "").strip() if self.zeo_client else "")

    def log(self, kind):
        """The instance's ``event`` or ``access`` log (``Log``)."""
        options = self.options
        if kind == "event":
            path, level = options.get("event-log", ""), options.get("event-log-level", "INFO")
        else:
            path = options.get("z2-log", options.get("access-log", ""))
            level = options.get("access-log-level", options.get("z2-log-level", "INFO"))
        return Log(
            disabled=path.strip().lower() == "disable",
            level=level.strip(),
            handler=options.get(f"{kind}-log-handler", "").strip(),
            args=options.get(f"{kind}-log-args", "").strip(),
            kwargs=options.get(f"{kind}-log-kwargs", "").strip(),
        )

    def _pipeline(self, name, options):
        """The pipeline the instance's own ``wsgi.ini`` runs, and the filter
        sections it adds for its options: ``{filter name: {key: value}}``.

        As plone.recipe.zope2instance makes them: ``access-log = disable``
        drops the translogger; ``sentry_dsn`` and ``profile = on`` insert
        their filters before ``zope``.
        """
        pipeline = (options.get("pipeline") or DEFAULT_PIPELINE).split()
        if self.log("access").disabled:
            pipeline = [entry for entry in pipeline if entry != "translogger"]
        filters = {}
        if options.get("sentry_dsn", "").strip():
            filters["sentry"] = {
                "use": "egg:plone.recipe.zope2instance#sentry",
                "dsn": options["sentry_dsn"].strip(),
                "level": options.get("sentry_level", "INFO"),
                "event_level": options.get("sentry_event_level", "ERROR"),
                "ignorelist": options.get("sentry_ignore", ""),
                "max_value_length": options.get("sentry_max_value_length", ""),
            }
        if options.get("profile", "").strip() == "on":
            log = os.path.join(self.var, "log")
            filters["profile"] = {
                "use": "egg:repoze.profile",
                "log_filename": options.get(
                    "profile_log_filename", os.path.join(log, f"profile-{name}.raw")),
                "cachegrind_filename": options.get(
                    "profile_cachegrind_filename", os.path.join(log, f"cachegrind.out.{name}")),
                "discard_first_request": options.get("profile_discard_first_request", "true"),
                "path": options.get("profile_path", "/__profile__"),
                "flush_at_shutdown": options.get("profile_flush_at_shutdown", "true"),
                "unwind": options.get("profile_unwind", "false"),
            }
        for entry in filters:
            pipeline.insert(pipeline.index("zope") if "zope" in pipeline else len(pipeline), entry)
        return pipeline, filters

    def sessions_in_memory(self, working_set):
        """Whether Zope keeps its sessions (``/temp_folder``) in a temporary
        storage in each process's memory.

        As the instance recipe writes ``zodb-temporary-storage``: on by
        default, off by default when Products.CMFPlone is installed (Plone 6
        keeps nothing in Zope sessions), else the ``<zodb_db>`` section it
        gives, in memory when that is a ``<temporarystorage>``.
        """
        value = self.options.get("zodb-temporary-storage")
        if value is None:
            return not any(working_set.by_key.get(key) for key in (
                "products-cmfplone", "products.cmfplone", "Products.CMFPlone"))
        if value.strip().lower() in ("on", "true", "1"):
            return True
        return "<temporarystorage>" in value.lower()

    @property
    def database(self):
        """The rules on workers this instance's database asks for."""
        from plone.recipe.gunicorn.preflight import Database
        return Database(self.shares_database, self.zeo_client_client)

    @property
    def zeo_client(self):
        """Whether the instance is a ZEO client (``zeo-client = on``)."""
        return self.options.get("zeo-client", "").strip().lower() in TRUE

    @property
    def shares_database(self):
        """True when other processes may open the same database safely.

        A ZEO client or a RelStorage instance: several gunicorn workers are
        safe.  Anything else is a FileStorage that one process must own.
        """
        return self.zeo_client or bool(self.options.get("rel-storage", "").strip())
