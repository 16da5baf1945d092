"""gunicorn settings from text: part options in, values gunicorn accepts out.

Buildout options and PasteDeploy ``[server:main]`` keys are both plain text.
This module turns such text into the value of a gunicorn setting the way
gunicorn's own command line does (the setting's argparse ``type``, its
``action``, then its validator from ``gunicorn.config``), so that a value
accepted at buildout time is the value gunicorn will run with.  It also turns
plone.recipe.zope2instance's ``http-address`` into gunicorn binds.

It is used by the recipe at buildout time and by the runtime at start, so it
must not import zc.buildout.
"""

import difflib
import ipaddress
import os
import re
import socket

from gunicorn import util
from gunicorn.config import Config
from gunicorn.glogging import Logger, parse_syslog_address

# Settings that hold lists take one item per line; bind, like http-address,
# also takes white space between addresses.
_WHITESPACE_LISTS = {"bind"}
_FLAG_ACTIONS = {"store_true", "store_false", "store_const"}

# The recipe's workers: gunicorn's sync and gthread workers, but ones that
# clients that send nothing, trickle their headers in or are slow to close
# cannot hold, and a sync worker that keeps connections alive (worker.py).
SYNC_WORKER = "plone.recipe.gunicorn.worker.SyncWorker"
THREAD_WORKER = "plone.recipe.gunicorn.worker.ThreadWorker"

# gunicorn's log levels, least severe first.
LOG_LEVELS = sorted(Logger.LOG_LEVELS, key=Logger.LOG_LEVELS.get)

SYSLOG_ADDRESSES = "unix://PATH (#dgram or #stream after it), udp://HOST:PORT or tcp://HOST:PORT"


def is_syslog_address(text):
    """Whether gunicorn's logger can read ``text`` (its validator takes any text)."""
    try:
        parse_syslog_address(text)
    except RuntimeError:  # "invalid syslog address", "... is not a valid port number."
        return False
    return True


# Values gunicorn accepts that cannot serve Zope: setting -> (test, what is right).
STRICTER = {
    "workers": (lambda n: n >= 1, "at least 1 is needed: with none the server "
                "accepts connections and answers none"),
    "threads": (lambda n: n >= 1, "at least 1 is needed"),
    "loglevel": (lambda level: level.lower() in LOG_LEVELS,
                 f"use one of {', '.join(LOG_LEVELS)} (it also sets the event log's level)"),
    # checked without syslog = true too: gunicorn fails on it once that is set
    "syslog_addr": (is_syslog_address, f"gunicorn reads {SYSLOG_ADDRESSES}"),
}


class SettingError(ValueError):
    """A text value that cannot become a gunicorn setting.

    ``option`` is the name as the user wrote it, ``value`` the text, and
    ``reason`` a sentence saying what would be right.
    """

    def __init__(self, option, value, reason):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option} = {value!r}: {reason}")


def known_settings():
    """gunicorn's settings by name, as this gunicorn version defines them."""
    return Config().settings


def setting_name(option):
    """The gunicorn setting an option names: ``worker-class`` is ``worker_class``."""
    return option.strip().lower().replace("-", "_")


def check_name(option):
    """Return the setting name for ``option`` or raise SettingError.

    The error suggests the closest real setting name for a misspelling.
    """
    name = setting_name(option)
    settings = known_settings()
    if name in settings:
        return name
    close = difflib.get_close_matches(name, settings, n=1)
    hint = f"did you mean {close[0].replace('_', '-')}?" if close else (
        "see gunicorn's settings reference for the names it knows")
    raise SettingError(option, "", f"gunicorn has no setting {name!r}; {hint}")


def convert(option, text):
    """The value to give gunicorn's ``Config.set`` for ``option`` written as ``text``.

    Converted as gunicorn's command line converts it and checked by the
    setting's validator; SettingError says what is wrong.
    """
    name = check_name(option)
    config = Config()
    setting = config.settings[name]
    if not setting.cli or setting.type is callable:
        # Hooks and dictionaries have no text form on gunicorn's command line.
        raise SettingError(
            option, text,
            f"gunicorn's {name} cannot be written as text; set it in a gunicorn "
            "config file and name that file with the config option")
    try:
        if setting.action in _FLAG_ACTIONS:
            value = text.strip()
        elif setting.action == "append":
            value = [_coerce(setting, item) for item in split_list(name, text)]
        else:
            value = _coerce(setting, text.strip())
        config.set(name, value)
    except Exception as exc:  # gunicorn's validators raise several kinds
        raise SettingError(option, text, _describe(setting, exc)) from None
    # A switch as gunicorn reads it ("false" is False); other values as
    # written, which the validators accepted.
    return setting.get() if setting.action in _FLAG_ACTIONS else value


# Settings whose values are paths (by gunicorn's metavar), and chdir.
_PATH_METAS = {"FILE", "FILES", "DIR", "PATH", "CONFIG"}

# A unix socket's address as gunicorn reads it: for bind and statsd_host
# "unix:PATH" or "unix://PATH" (util.parse_address), for syslog_addr
# "unix://PATH", with "#dgram" or "#stream" after it (parse_syslog_address).
# "unix:8125" in statsd_host is a host named unix (validate_statsd_address).
_UNIX_ADDRESS = {
    "bind": re.compile(r"unix:(//)?"),
    "statsd_host": re.compile(r"unix:(//|(?!\d+$))"),
    "syslog_addr": re.compile(r"unix://"),
}


def absolute(name, value, directory):
    """A converted ``value`` of setting ``name`` with each relative path in it
    taken from ``directory``: files the part names, the unix sockets it binds
    or logs to."""
    if name == "bind":
        return [_unix_absolute(name, address, directory) for address in value]
    if name in _UNIX_ADDRESS:
        return _unix_absolute(name, value, directory)
    if name != "chdir" and known_settings()[name].meta not in _PATH_METAS:
        return value
    if isinstance(value, list):
        return [os.path.join(directory, path) for path in value]
    return os.path.join(directory, value) if value and value != "-" else value


def _unix_absolute(name, address, directory):
    """``address`` with a unix socket's relative path taken from ``directory``,
    written ``unix:/path`` (``unix:///path`` for syslog, which knows no other
    form); any other address as it is."""
    match = _UNIX_ADDRESS[name].match(address)
    if not match:
        return address
    path = os.path.join(directory, address[match.end():])
    return f"unix://{path}" if name == "syslog_addr" else f"unix:{path}"


def worker_for(worker_class, threads):
    """The worker class that serves: gunicorn runs its own gthread worker
    instead of any sync worker given threads; the recipe's sync worker gets
    the recipe's thread worker instead, so that it keeps its client limits."""
    if worker_class == SYNC_WORKER and threads > 1:
        return THREAD_WORKER
    return worker_class


def _coerce(setting, text):
    if setting.type is None:
        return text
    return setting.type(text)


def _describe(setting, exc):
    kind = {
        "store_true": "true or false",
        "store_false": "true or false",
        "store_const": "true or false",
    }.get(setting.action) or {int: "a whole number"}.get(setting.type)
    if kind is None and setting.type is not None:
        kind = "a number (octal like 0o022 or 022 allowed)"
    expected = f"gunicorn expects {kind} for {setting.name}" if kind else (
        f"gunicorn rejects it for {setting.name}")
    return f"{expected} ({setting.short.rstrip('.')}): {exc}"


def split_list(name, text):
    """Items of a list-valued setting written as text."""
    if name in _WHITESPACE_LISTS:
        return text.split()
    return [line.strip() for line in text.splitlines() if line.strip()]


def to_text(name, value):
    """The text form of a converted value, for an ini file; ``convert`` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "\n".join(str(item) for item in value)
    return str(value)


# http-address and bind --------------------------------------------------

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(?P<port>\d+)$")


def bind_from_http_address(http_address):
    """gunicorn binds for a plone.recipe.zope2instance ``http-address``.

    The instance's rules: addresses are separated by white space, a bare port
    means all IPv4 interfaces (``0.0.0.0:PORT``), ``ip:port`` is kept.  Also
    kept: ``[::1]:8080`` and ``unix:/path/to/socket``.  Two forms gunicorn
    reads otherwise become what waitress makes of them under ``bin/instance``:
    ``*:PORT`` is every interface of both families, ``0.0.0.0:PORT`` and,
    where the host has IPv6, ``[::]:PORT`` (``ipv6_only`` lets the two share
    the port); a host name is every address it resolves to now
    (``localhost:8080``: ``127.0.0.1:8080`` and, where the host names it so,
    ``[::1]:8080``), where gunicorn would listen on its first IPv4 address.
    """
    binds = []
    for address in http_address.split():
        if address.isdigit():
            address = f"0.0.0.0:{address}"
        if address.startswith("*:"):
            _, port = _host_port(address)
            binds += [f"0.0.0.0:{port}"] + ([f"[::]:{port}"] if has_ipv6() else [])
        elif is_host_name(check_bind(address)):
            binds += _resolve(*_host_port(address))
        else:
            binds.append(address)
    if not binds:
        raise ValueError("it names no address; give a port like 8080 or host:port")
    return list(dict.fromkeys(binds))  # each once, as waitress listens


def check_bind(address):
    """Return ``address`` if gunicorn can listen on it, else raise ValueError."""
    if address.startswith("unix:"):
        if len(address) == len("unix:"):
            raise ValueError(f"{address!r} has no socket path; write unix:/path/to/socket")
        return address
    if address.startswith("fd://"):
        if not address[len("fd://"):].isdigit():
            raise ValueError(f"{address!r} is not fd://NUMBER")
        return address
    host, port = _host_port(address)
    if host == "*":
        raise ValueError(
            f"{address!r}: gunicorn does not know the host '*'; for every interface "
            f"write 0.0.0.0:{port} [::]:{port}")
    return address


def is_host_name(bind):
    """Whether a checked bind is ``HOST:PORT`` with a name, not an IP address."""
    if bind.startswith(("unix:", "fd://", "[")):
        return False
    host, _ = _host_port(bind)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def _resolve(host, port):
    """The binds for every address of the host name ``host``, as waitress
    listens on each; ValueError when it has none."""
    try:
        found = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"the host name {host!r} does not resolve here ({exc.strerror}); "
                         f"write an IP address, like 127.0.0.1:{port}") from None
    binds = []
    for family, _, _, _, (ip, *_) in found:
        if family == socket.AF_INET:
            binds.append(f"{ip}:{port}")
        elif family == socket.AF_INET6 and has_ipv6():
            binds.append(f"[{ip}]:{port}")
    if not binds:
        raise ValueError(f"the host name {host!r} has no address this host can listen on; "
                         f"write an IP address, like 127.0.0.1:{port}")
    return binds


def _host_port(address):
    """``(host, port)`` of a TCP address, or ValueError."""
    match = _HOST_PORT.match(address)
    if match is None:
        raise ValueError(
            f"{address!r} is not an address; write PORT, HOST:PORT, [IPv6]:PORT "
            "or unix:/path/to/socket")
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"port {port} in {address!r} is out of range 1-65535")
    return match["host"], port


def has_ipv6():
    """Whether this host can make IPv6 sockets."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def parse_binds(binds):
    """gunicorn binds as gunicorn parses them (its ``cfg.address``)."""
    return [util.parse_address(bind) for bind in binds]


def ipv6_only(addresses):
    """The IPv6 wildcard listeners that must take IPv6 connections only.

    ``addresses`` as gunicorn parses binds (``cfg.address``): ``(host,
    port)``, a unix socket path or a file descriptor.  On Linux a listener on
    ``[::]`` takes IPv4 connections too, so it cannot share its port with an
    IPv4 listener: gunicorn fails to bind ``0.0.0.0:8080 [::]:8080``.  waitress
    makes each IPv6 listener IPv6 only, and both serve under ``bin/instance``;
    the recipe does so for such a pair.  A lone ``[::]:8080`` keeps gunicorn's
    meaning, both families.
    """
    tcp = [address for address in addresses if isinstance(address, tuple)]
    ipv4_ports = {port for host, port in tcp if not util.is_ipv6(host)}
    return {(host, port) for host, port in tcp
            if util.is_ipv6(host) and ipaddress.ip_address(host).is_unspecified
            and port in ipv4_ports}
