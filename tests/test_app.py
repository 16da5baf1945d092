"""The per-worker Zope application wrapper, on its own."""

import io
import os
import time

from plone.recipe.gunicorn.app import LocalhostOnUnixSocket, RewindableInput, startup_lock


class Stream(io.RawIOBase):
    """A request body as gunicorn hands it over: readable, not seekable."""

    def __init__(self, data):
        self.data = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.data.readinto(buffer)


def read_twice(environ):
    """What Zope sees of a body it reads, rewinds after a ConflictError, and reads again."""
    seen = []

    def zope_like(environ, start_response):
        body = environ["wsgi.input"]
        seen.append(body.read())
        body.seek(0)  # what ZPublisher's HTTPRequest.retry does after a ConflictError
        seen.append(body.read())
        start_response("200 OK", [])
        return [b""]

    RewindableInput(zope_like)(environ, lambda *a: None)
    return seen


def test_body_can_be_read_again_after_a_retry():
    payload = b"title=x" * 300_000  # over the in-memory limit: spooled to a file
    environ = {"wsgi.input": Stream(payload), "CONTENT_LENGTH": str(len(payload))}
    assert read_twice(environ) == [payload, payload]


def test_chunked_body_without_length_can_be_read_again():
    environ = {"wsgi.input": Stream(b"a=1&b=2"), "HTTP_TRANSFER_ENCODING": "chunked"}
    assert read_twice(environ) == [b"a=1&b=2", b"a=1&b=2"]


def test_request_without_body_gets_an_empty_seekable_input():
    for environ in ({"wsgi.input": Stream(b"")}, {"wsgi.input": Stream(b""), "CONTENT_LENGTH": "0"}):
        assert read_twice(environ) == [b"", b""]


def test_seekable_input_is_passed_through():
    body = io.BytesIO(b"a=1")
    environ = {"wsgi.input": body}
    RewindableInput(lambda env, sr: [env["wsgi.input"]])(environ, None)
    assert environ["wsgi.input"] is body


def test_startup_lock_lets_one_process_start_zope_at_a_time(tmp_path):
    zope_conf = tmp_path / "zope.conf"
    zope_conf.write_text("")
    with startup_lock(zope_conf):
        pid = os.fork()
        if pid == 0:  # a second worker: must wait for the first
            with startup_lock(zope_conf):
                os._exit(0)
        time.sleep(0.5)
        finished, _ = os.waitpid(pid, os.WNOHANG)
    assert finished == 0, "the second process started while the first held the lock"
    assert os.waitpid(pid, 0)[1] == 0  # and got the lock once it was released


def call_limited(environ, max_body):
    """Status of a request through RewindableInput(max_body), and what Zope read."""
    statuses, seen = [], []

    def zope_like(environ, start_response):
        seen.append(environ["wsgi.input"].read())
        start_response("200 OK", [])
        return [b""]

    RewindableInput(zope_like, max_body)(environ, lambda status, headers: statuses.append(status))
    return statuses[0], seen


def test_body_over_max_request_body_size_is_refused():
    stream = Stream(b"a=12345678")
    status, seen = call_limited({"wsgi.input": stream, "CONTENT_LENGTH": "11"}, 10)
    assert (status, seen) == ("413 Request Entity Too Large", [])
    assert stream.data.tell() == 0  # announced too large: not a byte read
    chunked = {"wsgi.input": Stream(b"a=123456789"), "HTTP_TRANSFER_ENCODING": "chunked"}
    assert call_limited(chunked, 10) == ("413 Request Entity Too Large", [])
    at_limit = {"wsgi.input": Stream(b"a=12345678"), "HTTP_TRANSFER_ENCODING": "chunked"}
    assert call_limited(at_limit, 10) == ("200 OK", [b"a=12345678"])


def server_seen(environ):
    """SERVER_NAME and SERVER_PORT as Zope sees them through LocalhostOnUnixSocket."""
    return LocalhostOnUnixSocket(
        lambda env, sr: (env["SERVER_NAME"], env["SERVER_PORT"]))(environ, None)


def test_request_without_host_over_a_unix_socket_is_for_localhost():
    # gunicorn's environ for "GET / HTTP/1.0" without Host on unix:/srv/var/zope.sock
    unix = {"SERVER_NAME": "/srv/var/zope.sock", "SERVER_PORT": ""}
    assert server_seen({**unix, "wsgi.url_scheme": "http"}) == ("localhost", "80")
    assert server_seen({**unix, "wsgi.url_scheme": "https"}) == ("localhost", "443")


def test_server_name_and_port_gunicorn_knows_are_passed_through():
    tcp = {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8080", "wsgi.url_scheme": "http"}
    assert server_seen(tcp) == ("127.0.0.1", "8080")
    # over a unix socket with Host: gunicorn takes both from it
    hosted = {"SERVER_NAME": "www.example.org", "SERVER_PORT": "443", "wsgi.url_scheme": "https"}
    assert server_seen(hosted) == ("www.example.org", "443")
