"""gunicorn's sync worker, which a client that sends nothing cannot hold.

A sync worker serves one connection at a time, and gunicorn's reads the
request from a blocking socket.  A client that connects and then sends
nothing (a browser's speculative preconnect, a TCP health check, a port scan)
holds the worker until the master kills it for missing the worker
``timeout`` (300 s by the recipe's default), and as many such clients as
there are workers stop the site.  This worker

- asks the kernel not to hand over a TCP connection before its first bytes
  arrive (``TCP_DEFER_ACCEPT``, Linux; what Apache does by default), so a
  silent client costs no worker at all while the kernel holds it (a few
  seconds, then it hands the connection over anyway);
- gives a connection it does get gunicorn's ``keepalive`` seconds (2 by
  default; at least one) to send its first bytes, and closes it otherwise,
  as gunicorn's gthread worker does with a connection that sends no request.

A request that has arrived costs one ``poll``.
"""

import math
import select
import socket

from gunicorn.workers import sync


class SyncWorker(sync.SyncWorker):
    """``worker-class = plone.recipe.gunicorn.worker.SyncWorker``."""

    def init_process(self):
        # Seconds a new connection has to send its request: keepalive, at
        # least one, and within the master's heartbeat (self.timeout is half
        # the worker timeout), so that a waiting worker is not killed.
        self.request_wait = min(max(self.cfg.keepalive, 1), self.timeout)
        # The listening sockets are the master's, shared by all workers:
        # setting the option again is harmless.
        for listener in self.sockets:
            if listener.family in (socket.AF_INET, socket.AF_INET6) and hasattr(
                    socket, "TCP_DEFER_ACCEPT"):
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                    math.ceil(self.request_wait))
        super().init_process()  # runs the worker until it exits

    def handle(self, listener, client, addr):
        if sent_something(client, self.request_wait):
            super().handle(listener, client, addr)
        else:
            self.log.debug("Closed a connection from %s that sent no request in %ss",
                           addr, self.request_wait)
            client.close()


def sent_something(client, seconds):
    """Whether the client sent bytes (or closed) within ``seconds``."""
    poller = select.poll()
    poller.register(client, select.POLLIN)
    return bool(poller.poll(seconds * 1000))
