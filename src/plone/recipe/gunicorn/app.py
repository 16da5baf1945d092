"""The Zope WSGI application, created once per gunicorn worker.

Zope opens its database when the application is created.  gunicorn must
therefore create it in each worker after forking, never in the master: a
forked FileStorage handle is shared by several processes (corruption) and a
forked ZEO client has lost its networking thread (every request hangs).

Workers of one master boot at the same moment.  On a fresh, empty database
each of them would create the Zope root object and all but one would fail
with a ConflictError, which makes gunicorn stop the whole server.  Creating
the application under an exclusive lock on ``zope.conf`` lets the workers of
one host do it one after the other; the second finds the root in place.
"""

import fcntl
from contextlib import contextmanager


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

    with startup_lock(zope_conf):
        return make_wsgi_app(global_conf, zope_conf)
