"""Text in, gunicorn settings out: the conversions the recipe and the runtime share."""

import socket

import pytest

from plone.recipe.gunicorn import settings


@pytest.mark.parametrize("http_address, binds", [
    ("8080", ["0.0.0.0:8080"]),
    ("127.0.0.1:8080", ["127.0.0.1:8080"]),
    ("[::1]:8080", ["[::1]:8080"]),
    ("unix:/run/zope/zope.sock", ["unix:/run/zope/zope.sock"]),
    ("127.0.0.1:8080 8081\n  [::1]:8082", ["127.0.0.1:8080", "0.0.0.0:8081", "[::1]:8082"]),
    # waitress's every interface; this host has IPv6 (as test_recipe asserts)
    ("*:8080", ["0.0.0.0:8080", "[::]:8080"]),
])
def test_bind_follows_the_instance_rules_for_http_address(http_address, binds):
    assert settings.bind_from_http_address(http_address) == binds


def test_a_host_name_in_http_address_binds_every_address_it_has(monkeypatch):
    # waitress listens on each address of a host name; gunicorn, given the
    # name, on its first IPv4 one.  This machine's /etc/hosts gives localhost
    # 127.0.0.1 only; the resolver is replaced to answer as Debian's does
    # (::1 too), and with an address twice, as getaddrinfo may.  A name that
    # does not resolve: test_recipe's BROKEN table, through buildout.
    def getaddrinfo(host, port, family, kind, proto, flags):
        assert (host, family, flags) == ("localhost", socket.AF_UNSPEC, socket.AI_PASSIVE)
        return [(f, kind, proto, "", (ip, port, *extra)) for f, ip, *extra in [
            (socket.AF_INET6, "::1", 0, 0), (socket.AF_INET, "127.0.0.1"),
            (socket.AF_INET, "127.0.0.1")]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert settings.bind_from_http_address("localhost:8080 8081 127.0.0.1:8080") == [
        "[::1]:8080", "127.0.0.1:8080", "0.0.0.0:8081"]
    monkeypatch.setattr(settings, "has_ipv6", lambda: False)
    assert settings.bind_from_http_address("localhost:8080") == ["127.0.0.1:8080"]


@pytest.mark.parametrize("http_address, complaint", [
    ("", "names no address"),
    ("127.0.0.1:", "is not an address"),
    ("127.0.0.1:80a", "is not an address"),
    ("127.0.0.1:70000", "out of range"),
    ("0", "out of range"),
    ("::1:8080", "is not an address"),
    ("unix:", "no socket path"),
    ("*:http", "is not an address"),
    ("*:0", "out of range"),
])
def test_malformed_http_address_is_refused(http_address, complaint):
    with pytest.raises(ValueError, match=complaint):
        settings.bind_from_http_address(http_address)


def test_a_bind_to_host_star_says_what_gunicorn_takes_instead():
    with pytest.raises(ValueError, match=r"'\*:8080': gunicorn does not know the host '\*'; "
                       r"for every interface write 0.0.0.0:8080 \[::\]:8080"):
        settings.check_bind("*:8080")


@pytest.mark.parametrize("binds, only", [
    (["0.0.0.0:8080", "[::]:8080"], {("::", 8080)}),
    (["[::]:8080", "127.0.0.1:8080", "unix:/run/z.sock"], {("::", 8080)}),
    (["[::]:8080"], set()),  # alone: both families, as gunicorn binds it
    (["0.0.0.0:8080", "[::]:8081"], set()),
    (["127.0.0.1:8080", "[::1]:8080"], set()),  # only [::] takes IPv4 too
    (["fd://3", "localhost:8080"], set()),
])
def test_ipv6_wildcard_is_ipv6_only_where_an_ipv4_bind_has_its_port(binds, only):
    assert settings.ipv6_only(settings.parse_binds(binds)) == only


@pytest.mark.parametrize("option, text, value", [
    ("workers", "3", 3),
    ("worker-class", "gthread", "gthread"),
    ("worker_class", " sync ", "sync"),
    ("preload-app", "false", False),  # a switch is what gunicorn reads, not its text
    ("daemon", "True", True),
    ("umask", "022", 0o22),
    ("control-socket-mode", "0600", 0o600),
    ("bind", "127.0.0.1:1 unix:/tmp/z.sock", ["127.0.0.1:1", "unix:/tmp/z.sock"]),
    ("raw-env", "A=1\nB=two words", ["A=1", "B=two words"]),
    ("forwarded-allow-ips", "127.0.0.1,::1", "127.0.0.1,::1"),
    ("timeout", "120", 120),
])
def test_text_becomes_what_gunicorn_command_line_would_give(option, text, value):
    assert settings.convert(option, text) == value


@pytest.mark.parametrize("option, text, complaint", [
    ("workers", "two", "expects a whole number for workers"),
    ("workers", "-1", "must be positive"),
    ("preload-app", "maybe", "expects true or false"),
    ("forwarded-allow-ips", "not-an-ip", "rejects it for forwarded_allow_ips"),
    ("post-fork", "mymodule.hook", "cannot be written as text"),
    ("logconfig-dict", "{}", "cannot be written as text"),
])
def test_values_gunicorn_rejects_are_refused_with_a_reason(option, text, complaint):
    with pytest.raises(settings.SettingError, match=complaint) as info:
        settings.convert(option, text)
    assert info.value.option == option and info.value.value == text


def test_misspelt_setting_suggests_the_closest_name():
    with pytest.raises(settings.SettingError, match="did you mean worker-class"):
        settings.check_name("worker-clas")
    with pytest.raises(settings.SettingError, match="no setting 'flux_capacitor'"):
        settings.check_name("flux-capacitor")


@pytest.mark.parametrize("option, text", [
    ("bind", "127.0.0.1:1 [::1]:2"), ("workers", "4"), ("preload-app", "true"),
    ("raw-env", "A=1\nB=2"), ("forwarded-allow-ips", "10.0.0.0/8,127.0.0.1"),
])
def test_text_form_reads_back_to_the_same_value(option, text):
    value = settings.convert(option, text)
    assert settings.convert(option, settings.to_text(settings.setting_name(option), value)) == value


@pytest.mark.parametrize("name, value, result", [
    ("pidfile", "var/z.pid", "/srv/site/var/z.pid"),
    ("pidfile", "/run/z.pid", "/run/z.pid"),
    ("config", "etc/gunicorn.conf.py", "/srv/site/etc/gunicorn.conf.py"),
    ("control_socket", "var/z.ctl", "/srv/site/var/z.ctl"),
    ("worker_tmp_dir", "tmp", "/srv/site/tmp"),
    ("chdir", "parts", "/srv/site/parts"),
    ("reload_extra_files", ["etc/*.zcml", "/etc/z"], ["/srv/site/etc/*.zcml", "/etc/z"]),
    ("errorlog", "-", "-"),  # stderr, not a file
    ("accesslog", "", ""),  # none named: the recipe says so
    ("bind", ["127.0.0.1:8080", "unix:var/z.sock", "unix:/run/z.sock", "fd://3"],
     ["127.0.0.1:8080", "unix:/srv/site/var/z.sock", "unix:/run/z.sock", "fd://3"]),
    # gunicorn reads unix://PATH as unix:PATH: relative after the two slashes
    ("bind", ["unix://var/z.sock", "unix:///run/z.sock"],
     ["unix:/srv/site/var/z.sock", "unix:/run/z.sock"]),
    ("statsd_host", "unix:var/statsd.sock", "unix:/srv/site/var/statsd.sock"),
    ("statsd_host", "unix://var/statsd.sock", "unix:/srv/site/var/statsd.sock"),
    ("statsd_host", "unix:8125", "unix:8125"),  # gunicorn: host "unix", port 8125
    ("statsd_host", "localhost:8125", "localhost:8125"),
    ("syslog_addr", "unix://var/log.sock#dgram", "unix:///srv/site/var/log.sock#dgram"),
    ("syslog_addr", "unix:///dev/log", "unix:///dev/log"),
    ("syslog_addr", "udp://localhost:514", "udp://localhost:514"),
    ("proc_name", "var/z", "var/z"),  # not a path
    ("workers", 3, 3),
])
def test_relative_paths_are_taken_from_the_buildout_directory(name, value, result):
    assert settings.absolute(name, value, "/srv/site") == result
