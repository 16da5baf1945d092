"""Render the files a gunicorn part consists of, from the templates beside this module.

Every function but ``listen_streams`` (binds as systemd socket addresses)
returns ``{file name: text}``; the recipe decides where and whether to write.  Templates use ``string.Template`` (``${name}``) because the
files themselves are full of ``%(...)s`` and braces.
"""

import configparser
import ipaddress
import os
import pprint
import re
import shlex
from importlib.resources import files
from string import Template

from plone.recipe.gunicorn import settings as gsettings


def template(name):
    return Template(files("plone.recipe.gunicorn").joinpath("templates", name).read_text())


def logging_ini(eventlog, accesslog, loglevel, gunicorn_access_level):
    """Logging shared by both modes: the Zope event log and gunicorn's messages in
    ``var/log/<part>.log`` and on stderr, requests in ``var/log/<part>-access.log``.

    WatchedFileHandler reopens a file that logrotate moved away.
    """
    return template("logging.ini").substitute(
        eventlog=eventlog,
        accesslog=accesslog,
        loglevel=loglevel.upper(),
        gunicorn_access_level=gunicorn_access_level,
    )


def ini_mode(context, server_settings, pipeline, filters=None):
    """``gunicorn.ini``: PasteDeploy ini with a gunicorn ``[server:main]``.

    Requests are logged by the pipeline's translogger, as the instance does,
    so gunicorn's own access logger stays quiet.  ``filters`` are more filter
    sections, ``{name: {key: value}}`` (the instance's sentry and profile).
    """
    lines = []
    for name, value in sorted(server_settings.items()):
        text = gsettings.to_text(name, value)
        if "\n" in text:
            text = "\n" + "\n".join("    " + line for line in text.splitlines())
        lines.append(f"{name} = {text}")
    ini = template("gunicorn.ini").substitute(
        context,
        server_settings="\n".join(lines),
        pipeline="\n    ".join(pipeline),
        filters="".join(
            f"[filter:{name}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items()) + "\n"
            for name, keys in (filters or {}).items()),
        logging=logging_ini(context["eventlog"], context["accesslog"],
                            context["loglevel"], "WARNING"),
    )
    # Catch a broken ini here rather than at start.
    configparser.ConfigParser(interpolation=None).read_string(ini)
    return {"gunicorn.ini": ini}


def script_mode(context, server_settings, pipeline, user_config=None):
    """``gunicornapp.py``, ``gunicorn.conf.py`` and the ``logging.ini`` it names.

    The application is the instance's pipeline, as in ini mode, but for the
    translogger: gunicorn's access log takes its place here.
    """
    lines = [f"{name} = {pprint.pformat(value)}" for name, value in sorted(server_settings.items())]
    if user_config:
        lines += [
            "",
            "# The part's config option: that file is read last, so its settings win.",
            f"with open({user_config!r}) as _config:",
            f"    exec(compile(_config.read(), {user_config!r}, 'exec'))",
        ]
    conf = template("gunicorn.conf.py").substitute(
        context,
        location=repr(context["location"]),
        logconfig=repr(context["logconfig"]),
        settings="\n".join(lines),
    )
    compile(conf, "gunicorn.conf.py", "exec")
    filters = [entry for entry in pipeline if entry not in ("translogger", "zope")]
    app = template("gunicornapp.py").substitute(
        context, zope_conf=repr(context["zope_conf"]), filters=pprint.pformat(filters))
    compile(app, "gunicornapp.py", "exec")
    logging = logging_ini(context["eventlog"], context["accesslog"], context["loglevel"], "INFO")
    return {"gunicorn.conf.py": conf, "gunicornapp.py": app, "logging.ini": logging}


# Files that run the part as a service ------------------------------------

# Seconds a service manager waits beyond graceful_timeout before it kills what
# is left: the master exits only after its last worker did.
STOP_MARGIN = 10


def systemd_unit(context, listen=(), user="", group="", ipv6_only=False):
    """``<part>.service`` and, given ``listen`` (ListenStream= values), ``<part>.socket``.

    ``context`` holds the part's paths and ``graceful_timeout``.  ``ipv6_only``:
    ``[::]`` shares a port with an IPv4 address, which systemd binds only
    with ``BindIPv6Only=ipv6-only`` (``settings.ipv6_only``).
    """
    part = context["part"]
    socket_file = f"{part}.socket"
    user_group = []
    if user:
        user_group.append(f"User={user}")
    if group:
        user_group.append(f"Group={group}")
    values = dict(
        context,
        unit_file=os.path.join(context["location"], f"{part}.service"),
        socket_file=os.path.join(context["location"], socket_file),
        directory=_unit_value(context["directory"]),
        exec_start=f"{_unit_arg(context['script_path'])} fg",
        stop_timeout=context["graceful_timeout"] + STOP_MARGIN,
        socket_dependency=f"Requires={socket_file}\nAfter={socket_file}" if listen else "",
        user_group="\n".join(user_group),
        listen="\n".join([f"ListenStream={_unit_value(stream)}" for stream in listen]
                          + (["BindIPv6Only=ipv6-only"] if ipv6_only else [])),
    )
    result = {f"{part}.service": _fill("systemd.service", values)}
    if listen:
        result[socket_file] = _fill("systemd.socket", values)
    return result


def listen_streams(binds, directory):
    """systemd ``ListenStream=`` values for gunicorn binds.

    ValueError for a bind systemd cannot listen on: a host name (systemd takes
    IP addresses) or an inherited ``fd://``.  A relative unix socket path is
    taken from ``directory``, the service's working directory.
    """
    streams = []
    for bind in binds:
        if bind.startswith("unix:"):
            streams.append(os.path.join(directory, bind[len("unix:"):]))
            continue
        if bind.startswith("fd://"):
            raise ValueError(f"bind {bind} is an inherited socket; systemd makes its "
                             "sockets from addresses: bind to HOST:PORT or unix:/path")
        host, _, port = bind.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"bind {bind}: systemd listens on IP addresses, not host names; "
                f"write 127.0.0.1:{port}, [::1]:{port} or 0.0.0.0:{port}") from None
        streams.append(bind)
    return streams


def logrotate(context):
    """``logrotate.conf``: the part's two logs, USR1 to the master if it runs."""
    values = dict(
        context,
        logs=" ".join(f'"{path}"' for path in (context["eventlog"], context["accesslog"])),
        pidfile=shlex.quote(context["pidfile"]),
        script_name=shlex.quote(os.path.basename(context["script_path"])),
        logrotate_file=os.path.join(context["location"], "logrotate.conf"),
        state_file=os.path.join(context["var"], "logrotate.status"),
    )
    return {"logrotate.conf": _fill("logrotate.conf", values)}


def supervisor(context):
    """``supervisor.conf``: a ``[program:<part>]`` running ``bin/<script> fg``."""
    # supervisor expands %(name)s in these values.
    values = dict(
        context,
        command=f"{shlex.quote(context['script_path'])} fg".replace("%", "%%"),
        directory=context["directory"].replace("%", "%%"),
        stop_timeout=context["graceful_timeout"] + STOP_MARGIN,
        supervisor_file=os.path.join(context["location"], "supervisor.conf"),
    )
    conf = _fill("supervisor.conf", values)
    configparser.RawConfigParser(inline_comment_prefixes=(";",)).read_string(conf)
    return {"supervisor.conf": conf}


_LONE_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def _fill(name, values):
    """Fill a template; a line holding only a placeholder whose value is empty goes."""
    lines = [line for line in template(name).template.splitlines(keepends=True)
             if not (lone := _LONE_PLACEHOLDER.fullmatch(line.strip())) or values[lone[1]]]
    return Template("".join(lines)).substitute(values)


def _unit_value(text):
    """``text`` in a unit file, where ``%`` starts a specifier."""
    return text.replace("%", "%%")


def _unit_arg(text):
    """One word of a unit's command line: quoted if need be, ``$`` and ``%`` escaped."""
    text = _unit_value(text).replace("$", "$$")
    if re.search(r"[\s\"'\\;]", text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
