"""The Zope WSGI application, created once per gunicorn worker.

Zope opens its database when the application is created.  gunicorn must
therefore create it in each worker after forking, never in the master: a
forked FileStorage handle is shared by several processes (corruption) and a
forked ZEO client has lost its networking thread (every request hangs).

Zope retries a request that met a ConflictError, and rewinds ``wsgi.input``
to read the body again.  gunicorn's request body is a stream without
``seek``: the retry itself fails and the client gets a 500.  ``RewindableInput``
gives Zope a seekable copy of the body, as waitress does.  Like waitress under
``bin/instance``, it refuses a body larger than the instance's
``max-request-body-size`` (413): gunicorn has no such limit, and the copy of
an endless upload would fill the disk.

Over a unix socket, gunicorn names the server by the request's ``Host``
header; a request without one (HTTP/1.0: a health check through ``nc -U``)
gets the socket's path as ``SERVER_NAME`` and an empty ``SERVER_PORT``, on
which Zope fails with a 500 and a traceback.  ``LocalhostOnUnixSocket`` makes
such a request one for ``localhost`` on the scheme's port.

Workers of one master boot at the same moment.  On a fresh, empty database
each of them would create the Zope root object and all but one would fail
with a ConflictError, which makes gunicorn stop the whole server.  Creating
the application under an exclusive lock on ``zope.conf`` lets the workers of
one host do it one after the other; the second finds the root in place.

An instance with ``zeo-client-client`` and no ``zeo-var`` keeps its ZEO cache
in ``$(ZEO_TMP)``, a name that ``bin/instance`` defines (as the temporary
directory) before Zope reads ``zope.conf``; so does ``make_zope_app``.
"""

import fcntl
import io
import os
import pwd
import re
import tempfile
from contextlib import contextmanager
from tempfile import SpooledTemporaryFile

# Bodies up to this size stay in memory; larger ones (uploads) go to a file.
SPOOL_IN_MEMORY = 1024 * 1024
COPY_CHUNK = 64 * 1024


@contextmanager
def startup_lock(zope_conf):
    """Hold an exclusive lock on ``zope_conf`` while Zope starts in this process."""
    with open(zope_conf, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_zope_app(global_conf, zope_conf, max_request_body_size=None, **local_conf):
    """PasteDeploy app factory: Zope's own ``make_wsgi_app``, one process at a time.

    ``max_request_body_size``: the instance's option, bytes (None: no limit).
    """
    from gunicorn.errors import AppImportError
    from Zope2.Startup.run import make_wsgi_app
    from ZConfig import ConfigurationError
    from zc.lockfile import LockError  # ZODB's, for its FileStorage and ZEO cache
    try:
        from ZEO.Exceptions import ClientDisconnected
    except ImportError:  # no ZEO installed: no ZEO client either
        ClientDisconnected = ()

    if os.environ.get("PLONE_RECIPE_GUNICORN_DEBUG"):  # bin/<part>-instance debug
        global_conf = {**global_conf, "debug_mode": "true"}
    # As plone.recipe.zope2instance's ctl.py: zope.conf may refer to it.
    os.environ["ZEO_TMP"] = tempfile.gettempdir()
    try:
        with startup_lock(zope_conf):
            application = make_wsgi_app(global_conf, zope_conf)
    except LockError as exc:
        # An AppImportError is said in one line, without a traceback, and
        # stops the server (runtime.ZopeDefaults.load).
        raise AppImportError(
            f"{exc}: another process holds it (bin/instance, or another gunicorn "
            "part); stop it first") from None
    except PermissionError as exc:  # var/ made by another user (root's buildout, say)
        # The traceback stays in the log at loglevel debug.
        raise AppImportError(
            f"{exc}: the server runs as user {user_name()}, who may not write "
            "there; give that user the directory and its files (chown -R), or "
            "start the server as its owner") from exc
    except ClientDisconnected as exc:  # ZEO's wait for its server (30 s) is over
        raise AppImportError(
            f"the ZEO server at {' '.join(zeo_servers(zope_conf)) or '?'} does not answer "
            f"({exc}); start it (bin/zeoserver start), or correct the instance's "
            "zeo-address") from exc
    except ConfigurationError as exc:  # zope.conf: unknown key, a directory gone
        message = str(exc)  # ZConfig names the file and line where it knows them
        if zope_conf not in message:
            message = f"{zope_conf}: {message}"
        raise AppImportError(message) from exc
    limit = None if max_request_body_size is None else int(max_request_body_size)
    return LocalhostOnUnixSocket(RewindableInput(application, limit))


def zeo_servers(zope_conf):
    """The ZEO server addresses ``zope_conf`` names (``server`` in ``<zeoclient>``)."""
    with open(zope_conf) as conf:
        clients = re.findall(r"<zeoclient>(.*?)</zeoclient>", conf.read(), re.S | re.I)
    return [address for client in clients
            for address in re.findall(r"^\s*server\s+(\S+)", client, re.M | re.I)]


def user_name():
    """The name of the user this process runs as (its number if it has none)."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class RewindableInput:
    """WSGI middleware: a seekable ``wsgi.input``, so Zope can retry a request;
    a body over ``max_body`` bytes is answered 413 before Zope sees it."""

    def __init__(self, app, max_body=None):
        self.app = app
        self.max_body = max_body

    def __call__(self, environ, start_response):
        stream = environ["wsgi.input"]
        seekable = getattr(stream, "seekable", None)
        if seekable is None or not seekable():
            if has_body(environ):
                if self.too_large(int(environ.get("CONTENT_LENGTH") or 0)):
                    return self.refuse(start_response)  # without reading it
                body = SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
                size = 0
                while chunk := stream.read(COPY_CHUNK):  # chunked: no length known
                    size += len(chunk)
                    if self.too_large(size):
                        body.close()
                        return self.refuse(start_response)
                    body.write(chunk)
                body.seek(0)
            else:  # most requests: GET, HEAD; no file to create and drop
                body = io.BytesIO()
            environ["wsgi.input"] = body
        return self.app(environ, start_response)

    def too_large(self, size):
        return self.max_body is not None and size > self.max_body

    def refuse(self, start_response):
        body = (f"Request Entity Too Large\r\n\r\nThe body exceeds {self.max_body} bytes "
                "(max-request-body-size).").encode()
        # Closing the connection: the rest of the body is never read.
        start_response("413 Request Entity Too Large", [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]


class LocalhostOnUnixSocket:
    """WSGI middleware: a request without ``Host`` over a unix socket is one
    for ``localhost`` on the scheme's default port, not for the socket's path
    on an empty port (on which Zope's ``HTTPRequest`` fails)."""

    DEFAULT_PORTS = {"http": "80", "https": "443"}

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        if not environ.get("SERVER_PORT"):  # gunicorn's sign of the case; else a port
            environ["SERVER_NAME"] = "localhost"
            environ["SERVER_PORT"] = self.DEFAULT_PORTS.get(environ.get("wsgi.url_scheme"), "80")
        return self.app(environ, start_response)


def has_body(environ):
    """Whether a request may carry a body: a length above 0, or chunks."""
    return (environ.get("CONTENT_LENGTH", "") not in ("", "0")
            or "HTTP_TRANSFER_ENCODING" in environ)
