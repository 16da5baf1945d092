"""Zope's own publishing rate, with no HTTP server: the compute limit.

Run by bench.py with the instance's interpreter, while the ZEO server runs:

    parts/instance/bin/interpreter inprocess.py ZOPE_CONF SECONDS [--wait]

Creates the Zope WSGI application as every server does, then calls it from
one thread with a ready-made WSGI environ, as fast as it answers, for each
path bench.py loads.  No socket, no parsing, no server: what one core can
publish.  Prints one JSON line: per path, requests/s and the CPU time of
one request.

With ``--wait`` it prints ``READY`` once Zope is warm and measures only on
SIGUSR1: bench.py starts one per core and lets them go at the same moment,
to see whether the cores publish as fast together as alone.
"""

import base64
import io
import json
import signal
import sys
import time

from Zope2.Startup.run import make_wsgi_app

ADMIN = "Basic " + base64.b64encode(b"admin:admin").decode()
PATHS = {"root": ("/", None), "zmi": ("/manage_main", ADMIN)}


def environ(path, auth):
    env = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "18080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1:18080",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if auth:
        env["HTTP_AUTHORIZATION"] = auth
    return env


def publish(app, path, auth):
    status = []
    result = app(environ(path, auth), lambda s, headers, exc_info=None: status.append(s))
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    if not status[0].startswith("200"):
        raise RuntimeError(f"{path} answered {status[0]}")
    return body


def run(app, path, auth, seconds):
    """Publish for ``seconds``: requests/s and CPU milliseconds per request."""
    count, start, cpu = 0, time.perf_counter(), time.process_time()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        publish(app, path, auth)
        count += 1
    return {"rps": count / (time.perf_counter() - start),
            "cpu_ms_per_request": 1000 * (time.process_time() - cpu) / count}


def main():
    zope_conf, seconds = sys.argv[1], float(sys.argv[2])
    wait = "--wait" in sys.argv[3:]
    if wait:  # blocked before Zope starts its threads, which inherit the mask
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    app = make_wsgi_app({}, zope_conf)
    for path, auth in PATHS.values():
        run(app, path, auth, 1.0)  # warm-up: caches, templates
    if wait:
        print("READY", flush=True)
        signal.sigwait({signal.SIGUSR1})
    result = {}
    for name, (path, auth) in PATHS.items():
        result[name] = run(app, path, auth, seconds)
    print("INPROCESS-JSON " + json.dumps(result), flush=True)


main()
