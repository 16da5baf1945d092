"""Render the files a gunicorn part consists of, from the templates beside this module.

Every function returns ``{file name: text}``; the recipe decides where and
whether to write.  Templates use ``string.Template`` (``${name}``) because the
files themselves are full of ``%(...)s`` and braces.
"""

import configparser
import pprint
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


def ini_mode(context, server_settings, pipeline):
    """``gunicorn.ini``: PasteDeploy ini with a gunicorn ``[server:main]``.

    Requests are logged by the pipeline's translogger, as the instance does,
    so gunicorn's own access logger stays quiet.
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
        logging=logging_ini(context["eventlog"], context["accesslog"],
                            context["loglevel"], "WARNING"),
    )
    # Catch a broken ini here rather than at start.
    configparser.ConfigParser(interpolation=None).read_string(ini)
    return {"gunicorn.ini": ini}


def script_mode(context, server_settings, user_config=None):
    """``gunicornapp.py``, ``gunicorn.conf.py`` and the ``logging.ini`` it names."""
    lines = [f"{name} = {_literal(value)}" for name, value in sorted(server_settings.items())]
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
    app = template("gunicornapp.py").substitute(context, zope_conf=repr(context["zope_conf"]))
    compile(app, "gunicornapp.py", "exec")
    logging = logging_ini(context["eventlog"], context["accesslog"], context["loglevel"], "INFO")
    return {"gunicorn.conf.py": conf, "gunicornapp.py": app, "logging.ini": logging}


def _literal(value):
    return pprint.pformat(value)
