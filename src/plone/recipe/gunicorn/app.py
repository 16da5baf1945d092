"""The Zope WSGI application, created once per gunicorn worker.

Zope opens its database when the application is created.  gunicorn must
therefore create it in each worker after forking, never in the master: a
forked FileStorage handle is shared by several processes (corruption) and a
forked ZEO client has lost its networking thread (every request hangs).

Zope retries a request that met a ConflictError, and rewinds ``wsgi.input``
to read the body again.  gunicorn's request body is a stream without
``seek``: the retry itself fails and the client gets a 500.  ``RewindableInput``
gives Zope a seekable copy of the body, as waitress does.

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
import shutil
import tempfile
from contextlib import contextmanager
from tempfile import SpooledTemporaryFile

# Bodies up to this size stay in memory; larger ones (uploads) go to a file.
SPOOL_IN_MEMORY = 1024 * 1024


@contextmanager
def startup_lock(zope_conf):
    """Hold an exclusive lock on ``zope_conf`` while Zope starts in this process."""
    with open(zope_conf, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_zope_app(global_conf, zope_conf, **local_conf):
    """PasteDeploy app factory: Zope's own ``make_wsgi_app``, one process at a time."""
    from Zope2.Startup.run import make_wsgi_app

    if os.environ.get("PLONE_RECIPE_GUNICORN_DEBUG"):  # bin/<part>-instance debug
        global_conf = {**global_conf, "debug_mode": "true"}
    # As plone.recipe.zope2instance's ctl.py: zope.conf may refer to it.
    os.environ["ZEO_TMP"] = tempfile.gettempdir()
    with startup_lock(zope_conf):
        return RewindableInput(make_wsgi_app(global_conf, zope_conf))


class RewindableInput:
    """WSGI middleware: a seekable ``wsgi.input``, so Zope can retry a request."""

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        stream = environ["wsgi.input"]
        seekable = getattr(stream, "seekable", None)
        if seekable is None or not seekable():
            if has_body(environ):
                body = SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
                shutil.copyfileobj(stream, body)
                body.seek(0)
            else:  # most requests: GET, HEAD; no file to create and drop
                body = io.BytesIO()
            environ["wsgi.input"] = body
        return self.app(environ, start_response)


def has_body(environ):
    """Whether a request may carry a body: a length above 0, or chunks."""
    return (environ.get("CONTENT_LENGTH", "") not in ("", "0")
            or "HTTP_TRANSFER_ENCODING" in environ)
