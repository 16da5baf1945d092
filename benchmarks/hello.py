"""The ceiling: a WSGI application that does nothing, answering about as many bytes as Zope's root page."""

BODY = b"<html><body>" + b"Hello, world! " * 20 + b"</body></html>\n"


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
