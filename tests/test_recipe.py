"""A buildout section in, files and scripts out: real buildout runs."""

import configparser
import gzip
import http.client
import os
import re
import runpy
import shutil
import socket
import subprocess
import sys
import zipfile

import pytest

from conftest import EGGS, REPO, datagrams_until, free_port, request, wait_until_serving


@pytest.fixture(scope="module")
def built(new_buildout):
    """One buildout with the parts users write: ini and script mode on a
    FileStorage instance, and a ZEO client instance with its own part."""
    port = free_port()
    buildout = new_buildout("render", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        parts = instance gunicorn gunicorn-script zeoclient gunicorn-zeo

        [instance]
        http-address = 127.0.0.1:{port}

        [gunicorn-script]
        recipe = plone.recipe.gunicorn
        mode = script
        bind = 127.0.0.1:{port + 1}
        max-requests = 1000

        [zeoclient]
        <= instance
        recipe = plone.recipe.zope2instance >= 6.0
        zeo-client = on
        zeo-address = 127.0.0.1:9
        pipeline =
            translogger
            egg:Zope#httpexceptions
            zope
        access-log = disable
        sentry_dsn = https://key@sentry.example.org/1
        sentry_level = WARNING
        profile = on

        [gunicorn-zeo]
        recipe = plone.recipe.gunicorn
        instance = zeoclient
        script-name = zope-gunicorn
        threads = 2
    """)
    buildout.run()
    buildout.port = port
    return buildout


def read_ini(path):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(path)
    return parser


def test_ini_mode_serves_the_instance_zope_conf_with_its_pipeline(built):
    ini = read_ini(built.path("parts", "gunicorn", "gunicorn.ini"))
    assert ini["server:main"]["use"] == "egg:plone.recipe.gunicorn#main"
    assert ini["app:zope"]["use"] == "egg:plone.recipe.gunicorn#zope"
    assert ini["app:zope"]["zope_conf"] == str(built.path("parts", "instance", "etc", "zope.conf"))
    assert ini["pipeline:main"]["pipeline"].split() == [
        "translogger", "egg:Zope#httpexceptions", "zope"]


def test_ini_mode_defaults_for_a_filestorage_instance(built):
    server = read_ini(built.path("parts", "gunicorn", "gunicorn.ini"))["server:main"]
    var = built.path("var")
    assert server["bind"] == f"127.0.0.1:{built.port}"
    assert server["workers"] == "1"  # a FileStorage belongs to one process
    assert server["shared_database"] == "false"  # for bin/instance running this ini
    # gunicorn's gthread worker that a silent client cannot hold, the instance's threads
    assert (server["worker_class"], server["threads"]) == (
        "plone.recipe.gunicorn.worker.ThreadWorker", "4")
    assert server["pidfile"] == str(var / "gunicorn.pid")
    assert server["control_socket"] == str(var / "gunicorn.ctl")
    assert server["proc_name"] == "gunicorn"
    assert server["forwarded_allow_ips"] == "127.0.0.1,::1"


def test_ini_mode_logs_into_the_part_logs(built):
    ini = read_ini(built.path("parts", "gunicorn", "gunicorn.ini"))
    log = built.path("var", "log")
    assert str(log / "gunicorn.log") in ini["handler_eventlog"]["args"]
    assert str(log / "gunicorn-access.log") in ini["handler_accesslog"]["args"]
    assert ini["logger_wsgi"]["handlers"] == "accesslog"  # the translogger's requests


def test_script_mode_writes_gunicorn_config_and_app_module(built):
    location = built.path("parts", "gunicorn-script")
    conf = runpy.run_path(str(location / "gunicorn.conf.py"))
    assert conf["wsgi_app"] == "gunicornapp:application"
    assert conf["pythonpath"] == str(location)
    assert conf["bind"] == [f"127.0.0.1:{built.port + 1}"]  # bind option beats http-address
    assert conf["max_requests"] == 1000
    assert conf["pidfile"] == str(built.path("var", "gunicorn-script.pid"))
    app = (location / "gunicornapp.py").read_text()
    assert repr(str(built.path("parts", "instance", "etc", "zope.conf"))) in app
    assert "application = " in app


def test_gunicorns_check_config_loads_the_application_as_check_does(built):
    # gunicorn's own --check-config loads the app before it puts script
    # mode's pythonpath on sys.path: "No module named 'gunicornapp'".
    result = subprocess.run(
        [built.path("bin", "gunicorn-script-instance"), "--check-config"],
        cwd=built.dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "configuration and application OK" in result.stdout


@pytest.mark.parametrize("part, port_offset", [("gunicorn", 0), ("gunicorn-script", 1)])
def test_a_config_file_on_the_command_line_is_read_after_the_parts(
        built, tmp_path, part, port_offset):
    # Started from elsewhere: gunicorn would read a gunicorn.conf.py there
    # when no -c is given, and a -c FILE instead of the part's own file.
    (tmp_path / "gunicorn.conf.py").write_text('proc_name = "stray"\n')
    extra = tmp_path / "extra.py"
    extra.write_text("max_requests = 5\nmax_requests_jitter = 2\n")

    def printed(*args, env=None):
        result = subprocess.run(
            [built.path("bin", f"{part}-instance"), "--print-config", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**os.environ, **(env or {})})
        assert result.returncode == 0, result.stderr
        assert "configuration and application OK" in result.stdout
        return dict(re.findall(r"^(\w+)\s+= (.*)$", result.stdout, re.M))

    assert printed()["proc_name"] == part
    settings = printed("-c", str(extra), "--max-requests", "7")
    assert settings["proc_name"] == part  # the part's configuration first
    assert settings["bind"] == f"['127.0.0.1:{built.port + port_offset}']"
    assert settings["max_requests_jitter"] == "2"  # then the file
    assert settings["max_requests"] == "7"  # then the command line
    # gunicorn's environment variable, as gunicorn reads it: after the file
    settings = printed(env={"GUNICORN_CMD_ARGS": f"-c {extra} --max-requests 9"})
    assert (settings["proc_name"], settings["max_requests_jitter"], settings["max_requests"]) == (
        part, "2", "9")


def test_shared_database_gets_workers_and_the_instance_pipeline(built):
    import os
    server = read_ini(built.path("parts", "gunicorn-zeo", "gunicorn.ini"))
    # one worker per core and one more (docs/benchmarks.rst), the recipe's own,
    # which a silent client cannot hold; with the part's threads its thread
    # worker (gunicorn would swap in its own gthread worker for a sync one)
    assert server["server:main"]["workers"] == str(os.cpu_count() + 1)
    assert server["server:main"]["worker_class"] == "plone.recipe.gunicorn.worker.ThreadWorker"
    assert server["server:main"]["threads"] == "2"
    assert server["app:zope"]["zope_conf"] == str(built.path("parts", "zeoclient", "etc", "zope.conf"))


def test_instance_options_that_add_filters_add_them_here_too(built):
    # As the instance's own wsgi.ini: access-log = disable drops the
    # translogger, sentry_dsn and profile = on add their filters before zope.
    ini = read_ini(built.path("parts", "gunicorn-zeo", "gunicorn.ini"))
    assert ini["pipeline:main"]["pipeline"].split() == [
        "egg:Zope#httpexceptions", "sentry", "profile", "zope"]
    sentry = ini["filter:sentry"]
    assert sentry["use"] == "egg:plone.recipe.zope2instance#sentry"
    assert (sentry["dsn"], sentry["level"], sentry["event_level"]) == (
        "https://key@sentry.example.org/1", "WARNING", "ERROR")
    profile = ini["filter:profile"]
    assert profile["use"] == "egg:repoze.profile"
    assert profile["log_filename"] == str(built.path("var", "log", "profile-zeoclient.raw"))


def test_scripts_are_named_after_the_part_and_carry_the_instance_eggs(built):
    script = built.path("bin", "gunicorn-instance").read_text()
    for egg in ("Zope-", "gunicorn-", "ZEO-", "plone.recipe.zope2instance-", "PasteDeploy-"):
        assert egg in script
    assert "runtime.main('ini', " in script
    assert "runtime.main('script', " in built.path("bin", "gunicorn-script-instance").read_text()
    assert built.path("bin", "zope-gunicorn").exists()  # script-name


def test_the_instances_initialization_code_runs_first_then_the_parts(new_buildout):
    """As in bin/instance (plone.recipe.zope2instance's ``initialization``,
    formatted with its options), before gunicorn starts: what it sets, the
    workers inherit.  The part may add its own, as zc.recipe.egg's scripts do."""
    buildout = new_buildout("initialization", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        initialization =
            import os
            open("ran.txt", "a").write("instance %(location)s\\n")
        [gunicorn]
        initialization = open("ran.txt", "a").write("part\\n")
    """)
    buildout.run()
    result = subprocess.run([str(buildout.path("bin", "gunicorn-instance")), "status"],
                            cwd=buildout.dir, capture_output=True, text=True, timeout=60)
    assert result.stdout == "gunicorn-instance: not running\n"
    assert buildout.path("ran.txt").read_text() == (
        f"instance {buildout.path('parts', 'instance')}\npart\n")


def test_sessions_kept_in_each_worker_are_named_at_buildout_time(new_buildout):
    """Zope's default temporary storage lives in one process's memory: with
    several workers a session begun in one is empty in the others.  Buildout
    says so, and what to do (Plone 6 keeps nothing there and has it off)."""
    buildout = new_buildout("sessions", f"""
        [buildout]
        extends = {REPO}/gunicorn.cfg
        parts = instance gunicorn gunicorn-one
        [instance]
        zodb-temporary-storage = on
        [gunicorn-one]
        recipe = plone.recipe.gunicorn
        bind = 127.0.0.1:{free_port()}
        workers = 1
    """)
    output = buildout.run().stdout
    assert ("gunicorn: 2 workers, and part [instance] keeps Zope's sessions in a "
            "temporary storage in each process's memory (zodb-temporary-storage): a "
            "session begun in one worker is empty in the others.  If nothing uses "
            "REQUEST.SESSION, set zodb-temporary-storage = off") in output
    assert output.count("keeps Zope's sessions") == 1  # not for the part with 1 worker
    assert "keeps Zope's sessions" not in buildout.run("instance:zodb-temporary-storage=off").stdout


@pytest.mark.parametrize("option, plone, in_memory", [
    (None, False, True),  # the instance recipe's default for Zope
    (None, True, False),  # ... and for Plone 6
    ("on", True, True),
    ("off", False, False),
    ("<zodb_db temporary>\n<temporarystorage>\n</temporarystorage>\nmount-point /temp_folder\n"
     "</zodb_db>", False, True),
    ("<zodb_db temporary>\n<zeoclient>\nserver 127.0.0.1:8100\nstorage temp\n</zeoclient>\n"
     "mount-point /temp_folder\n</zodb_db>", False, False),
])
def test_where_the_instance_keeps_sessions(option, plone, in_memory):
    from types import SimpleNamespace

    from plone.recipe.gunicorn.instance import Instance

    section = {"recipe": "plone.recipe.zope2instance"}
    if option is not None:
        section["zodb-temporary-storage"] = option
    buildout = {"buildout": {"directory": "/srv", "parts-directory": "/srv/parts"},
                "instance": section}
    working_set = SimpleNamespace(by_key={"products.cmfplone": object()} if plone else {})
    assert Instance(buildout, "gunicorn", "instance").sessions_in_memory(working_set) is in_memory


def test_generated_files_are_not_writable_by_others(built):
    for path in built.path("parts", "gunicorn-script").iterdir():
        assert not path.stat().st_mode & 0o022, path


# Bad input: one table of broken sections and the message each must produce.
# Every message names the part, the option and the value.
BROKEN = {
    "bad value": ("[gunicorn]\nworkers = two",
                  ["[gunicorn] workers = 'two'", "whole number"]),
    "negative value": ("[gunicorn]\ntimeout = -5",
                       ["[gunicorn] timeout = '-5'", "positive"]),
    "misspelt setting": ("[gunicorn]\nworker-clas = sync",
                         ["[gunicorn] worker-clas", "did you mean worker-class?"]),
    "unknown setting": ("[gunicorn]\nflux-capacitor = 1",
                        ["[gunicorn] flux-capacitor", "no setting 'flux_capacitor'"]),
    "hook as text": ("[gunicorn]\npost-fork = hooks.post_fork",
                     ["[gunicorn] post-fork = 'hooks.post_fork'", "config file"]),
    "same setting twice": ("[gunicorn]\nworker-class = sync\nworker_class = gthread",
                           ["[gunicorn]", "worker-class and worker_class"]),
    "unknown mode": ("[gunicorn]\nmode = fast",
                     ["[gunicorn] mode = fast", "use ini", "or script"]),
    "missing instance": ("[gunicorn]\ninstance = zope",
                         ["[gunicorn] instance = zope", "no part [zope]"]),
    "instance of another recipe": (
        "[gunicorn]\ninstance = other\n[other]\nrecipe = zc.recipe.egg\neggs = Zope",
        ["[gunicorn] instance = other", "not plone.recipe.zope2instance"]),
    "http-address out of range": ("[instance]\nhttp-address = 127.0.0.1:99999",
                                  ["[instance] http-address = '127.0.0.1:99999'", "1-65535",
                                   "(or give part [gunicorn] its own bind)"]),
    "http-address on a host name that does not resolve": (
        "[instance]\nhttp-address = no-such-host.invalid:8080",
        ["[instance] http-address = 'no-such-host.invalid:8080'",
         "the host name 'no-such-host.invalid' does not resolve here",
         "write an IP address, like 127.0.0.1:8080", "(or give part [gunicorn] its own bind)"]),
    "malformed bind": ("[gunicorn]\nbind = localhost:",
                       ["[gunicorn] bind = 'localhost:'", "HOST:PORT"]),
    "bind to host star": ("[gunicorn]\nbind = *:8080",
                          ["[gunicorn] bind = '*:8080'", "gunicorn does not know the host '*'",
                           "0.0.0.0:8080 [::]:8080"]),
    "egg that does not exist": (
        "[gunicorn]\neggs = no.such.distribution.for.this.test",
        ["no.such.distribution.for.this.test"]),
    "instance threads": ("[instance]\nthreads = many",
                         ["[instance] threads = 'many'", "whole number"]),
    "no instance threads": ("[instance]\nthreads = 0",
                            ["[instance] threads = '0'", "1 or more"]),
    "instance body size not bytes": ("[instance]\nmax-request-body-size = 1GB",
                                     ["[instance] max-request-body-size = '1GB'",
                                      "whole number of bytes"]),
    "instance log level unknown": ("[instance]\nevent-log-level = LOUD",
                                   ["[instance] event-log-level = 'LOUD'", "not a logging level"]),
    "instance access log level unknown": (
        "[instance]\naccess-log-level = quiet",
        ["[instance] access-log-level = 'quiet'", "DEBUG, INFO, WARNING"]),
    "instance log args without the file": (
        "[instance]\nevent-log-handler = FileHandler\nevent-log-args = (r'{1}', 'a')",
        ["[instance] event-log-args = \"(r'{1}', 'a')\"", "only {} may stand in braces"]),
    "no workers": ("[gunicorn]\nworkers = 0",
                   ["[gunicorn] workers = '0'", "at least 1", "answers none"]),
    "no threads": ("[gunicorn]\nthreads = 0", ["[gunicorn] threads = '0'", "at least 1"]),
    "log level unknown": ("[gunicorn]\nloglevel = verbose",
                          ["[gunicorn] loglevel = 'verbose'", "debug, info, warning"]),
    "syslog address without its scheme": (
        "[gunicorn]\nsyslog-addr = localhost:514",
        ["[gunicorn] syslog-addr = 'localhost:514'", "gunicorn reads unix://PATH",
         "udp://HOST:PORT or tcp://HOST:PORT"]),
    "several workers on a FileStorage": (
        "[gunicorn]\nworkers = 2",
        ["[gunicorn] workers = '2'", "FileStorage", "ZEO or RelStorage", "[instance]"]),
    "preload on a FileStorage": (
        "[gunicorn]\npreload-app = true",
        ["[gunicorn] preload-app = 'true'", "set preload_app = false"]),
    "persistent ZEO cache for several workers": (
        "[gunicorn]\nworkers = 2\n[instance]\nzeo-client = on\nzeo-client-client = zeo1",
        ["[gunicorn] workers = '2'", "zeo-client-client = zeo1", "one process",
         "use 1 worker", "(part [instance])"]),
    "preload on ZEO": (
        "[gunicorn]\npreload_app = true\n[instance]\nzeo-client = on",
        ["[gunicorn] preload_app = 'true'", "forked worker"]),
    "sentry in script mode": (
        "[gunicorn]\nmode = script\n[instance]\nsentry_dsn = https://key@sentry.example.org/1",
        ["[gunicorn] mode = script", "sets sentry_dsn", "use mode = ini"]),
    "pipeline filter unknown here": (
        "[instance]\npipeline = sentry zope",
        ["[instance] pipeline", "'sentry'", "egg:DISTRIBUTION#ENTRY_POINT"]),
    "error log a directory": (
        "[gunicorn]\nerrorlog = /tmp",
        ["[gunicorn] errorlog = '/tmp'", "a directory, not a file", "or - for stderr"]),
    "access log under a file": (
        "[gunicorn]\naccesslog = buildout.cfg/access.log",
        ["[gunicorn] accesslog = 'buildout.cfg/access.log'", "buildout.cfg is not a directory",
         "or - for stdout"]),
    "access log empty": (
        "[gunicorn]\naccesslog =",
        ["[gunicorn] accesslog = '': no file named", "or - for stdout"]),
    "logrotate with no log file": (
        "[gunicorn]\nlogrotate = true\nerrorlog = -\naccesslog = -",
        ["[gunicorn] logrotate = 'true'", "no log file to rotate"]),
    "service file switch not a switch": (
        "[gunicorn]\nsystemd-unit = maybe",
        ["[gunicorn] systemd-unit = 'maybe'", "write true or false"]),
    "logrotate not a switch": (
        "[gunicorn]\nlogrotate = weekly",
        ["[gunicorn] logrotate = 'weekly'", "write true or false"]),
    "systemd socket without the unit": (
        "[gunicorn]\nsystemd-socket = true",
        ["[gunicorn] systemd-socket = 'true'", "set systemd-unit = true"]),
    "systemd user not a name": (
        "[gunicorn]\nsystemd-unit = true\nsystemd-user = zope admin",
        ["[gunicorn] systemd-user = 'zope admin'", "not a user or group name"]),
    "systemd socket on a host name": (
        "[gunicorn]\nsystemd-unit = on\nsystemd-socket = on\nbind = localhost:8080",
        ["[gunicorn] systemd-socket = 'on'", "localhost:8080", "IP addresses"]),
    "daemon under supervisor": (
        "[gunicorn]\nsupervisor = true\ndaemon = true",
        ["[gunicorn] daemon = 'true'", "supervisor runs the server in the foreground",
         "set daemon = false"]),
    "daemon under systemd": (
        "[gunicorn]\nsystemd-unit = true\ndaemon = True",
        ["[gunicorn] daemon = 'True'", "systemd runs the server in the foreground"]),
}


@pytest.fixture(scope="module")
def guarded(new_buildout):
    """An installed buildout that broken configurations must leave intact."""
    address = f"127.0.0.1:{free_port()}"
    base = f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = {address}
    """
    buildout = new_buildout("guarded", base)
    buildout.run()
    buildout.address = address
    buildout.base = buildout.path("buildout.cfg").read_text()
    buildout.snapshot = {
        path: path.read_bytes() for path in (
            buildout.path("bin", "gunicorn-instance"),
            buildout.path("parts", "gunicorn", "gunicorn.ini"))}
    return buildout


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_bad_configuration_stops_buildout_with_a_clear_error(guarded, case):
    section, expected = BROKEN[case]
    guarded.path("buildout.cfg").write_text(guarded.base + "\n" + section + "\n")
    result = guarded.run(check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    for fragment in expected:
        assert fragment in output, output
    for path, content in guarded.snapshot.items():
        assert path.read_bytes() == content, f"{path} changed by a failed run"


def test_earlier_install_still_serves_after_the_failed_runs(guarded, servers):
    server = servers([guarded.path("bin", "gunicorn-instance")], guarded.dir, name="guarded")
    assert wait_until_serving(server, guarded.address) == 200
    assert server.stop() == 0


def test_daemon_false_is_welcome_under_systemd_and_supervisor(new_buildout):
    buildout = new_buildout("foreground", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [gunicorn]
        systemd-unit = true
        supervisor = true
        daemon = false
    """)
    buildout.run()
    server = read_ini(buildout.path("parts", "gunicorn", "gunicorn.ini"))["server:main"]
    assert server["daemon"] == "false"
    assert buildout.path("parts", "gunicorn", "gunicorn.service").exists()


def test_windows_is_refused_before_anything_else(monkeypatch):
    import zc.buildout
    from plone.recipe.gunicorn.recipe import Recipe

    # Windows cannot run here; only the platform check can be exercised.
    monkeypatch.setattr(sys, "platform", "win32")
    with pytest.raises(zc.buildout.UserError, match=r"\[gunicorn\] gunicorn runs on POSIX systems only"):
        Recipe({}, "gunicorn", {})


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_changing_http_address_moves_the_listening_address(new_buildout, servers, tmp_path):
    buildout = new_buildout("moves", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
    """)
    p = [free_port() for _ in range(8)]  # each one free now, not merely neighbours
    forms = [  # (http-address, addresses to try)
        (str(p[0]), [f"127.0.0.1:{p[0]}"]),
        (f"127.0.0.1:{p[1]}", [f"127.0.0.1:{p[1]}"]),
        # a host name: every address it has (here localhost is 127.0.0.1 only)
        (f"localhost:{p[7]}", [f"127.0.0.1:{p[7]}"]),
        (f"unix:{tmp_path}/zope.sock", [f"unix:{tmp_path}/zope.sock"]),
        (f"127.0.0.1:{p[2]} 127.0.0.1:{p[3]}", [f"127.0.0.1:{p[2]}", f"127.0.0.1:{p[3]}"]),
    ]
    assert _ipv6_loopback(), "this test needs the IPv6 loopback ::1"
    forms.insert(2, (f"[::1]:{p[4]}", [f"[::1]:{p[4]}"]))
    # Both families on one port, as waitress serves them under bin/instance;
    # gunicorn alone cannot bind the pair, nor knows '*'.
    forms += [(f"0.0.0.0:{p[5]} [::]:{p[5]}", [f"127.0.0.1:{p[5]}", f"[::1]:{p[5]}"]),
              (f"*:{p[6]}", [f"127.0.0.1:{p[6]}", f"[::1]:{p[6]}"])]
    previous = []
    for http_address, addresses in forms:
        buildout.run(f"instance:http-address={http_address}")
        server = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir,
                         name=f"gunicorn {http_address}")
        for address in addresses:
            assert wait_until_serving(server, address) == 200, http_address
        for address in previous:
            with pytest.raises(OSError):
                request(address, timeout=2)
        assert server.stop() == 0
        previous = addresses


def test_a_part_with_its_own_bind_does_not_read_the_instance_http_address(
        new_buildout, servers):
    # waitress serves an unbracketed IPv6 address (with http-fast-listen =
    # off); gunicorn knows only [::1]:PORT.  The part's own bind is the way out.
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("ownbind", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = ::1:{free_port()}
        http-fast-listen = off
    """)
    refused = buildout.run(check=False)
    assert refused.returncode != 0
    assert "(or give part [gunicorn] its own bind)" in refused.stdout + refused.stderr
    buildout.run(f"gunicorn:bind={address}")
    server = read_ini(buildout.path("parts", "gunicorn", "gunicorn.ini"))["server:main"]
    assert server["bind"] == address
    server = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="ownbind")
    assert wait_until_serving(server, address) == 200
    assert server.stop() == 0


def test_the_part_logs_with_the_instance_log_options(new_buildout, servers):
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("logs", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [instance]
        http-address = {address}
        event-log-level = WARN
        event-log-handler = logging.handlers.RotatingFileHandler
        event-log-args = (r'{{}}', 'a', 1000000, 3)
        access-log-handler = StreamHandler
        access-log-args = (sys.stdout,)
    """)
    log, access_log = buildout.path("var", "log", "gunicorn.log"), buildout.path(
        "var", "log", "gunicorn-access.log")
    result = buildout.run()
    # A master and its workers must not each rotate one file.
    assert ("part [instance] sets event-log-handler = logging.handlers.RotatingFileHandler"
            in result.stdout + result.stderr)
    ini = read_ini(buildout.path("parts", "gunicorn", "gunicorn.ini"))
    assert ini["handler_eventlog"]["class"] == "plone.recipe.gunicorn.logfile.WatchedFileHandler"
    assert ini["server:main"]["loglevel"] == "warning"

    def serve():
        server = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="logs")
        assert wait_until_serving(server, address) == 200
        assert server.stop() == 0
        return server.log_path.read_text(errors="replace")

    output = serve()
    assert '"GET / HTTP/1.1" 200' in output  # the access log's StreamHandler
    assert not access_log.exists()
    assert log.exists() and "Ready to handle requests" not in log.read_text()  # WARN

    log.unlink()
    buildout.run("instance:event-log=disable", "instance:event-log-level=INFO")
    assert "handler_eventlog" not in read_ini(buildout.path("parts", "gunicorn", "gunicorn.ini"))
    assert "Ready to handle requests" in serve()  # on the console, as under bin/instance
    assert not log.exists()


@pytest.mark.parametrize("mode", ["ini", "script"])
def test_gunicorns_errorlog_accesslog_and_syslog_say_where_the_part_logs(
        new_buildout, servers, mode):
    # gunicorn lets a logging configuration file, which the part always has,
    # silently replace these settings; the part applies them to its own.
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout(f"ownlogs-{mode}", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        [gunicorn]
        mode = {mode}
        bind = {address}
        errorlog = logs/zope.log
        accesslog = -
        access-log-format = %(s)s "%(r)s" took %(D)s us
        logrotate = true
    """)
    buildout.run()
    event_log = buildout.path("logs", "zope.log")  # the directory is made, as var/log is
    assert f'"{event_log}" {{' in buildout.path("parts", "gunicorn", "logrotate.conf").read_text()
    script = buildout.path("bin", "gunicorn-instance")

    def serve(path, *args):
        """Serve ``path`` once; return what the server wrote to stdout."""
        stdout = buildout.path(f"stdout-{len(args)}.txt")
        server = servers(["sh", "-c", f'exec "$0" "$@" 2>/dev/null >"{stdout}"', script, *args],
                         buildout.dir, name=f"ownlogs {mode} {args}")
        assert wait_until_serving(server, address) == 200
        assert request(address, path)[0] == 200
        assert server.stop() == 0
        return stdout.read_text()

    # accesslog = -, in the part's format (in ini mode gunicorn's access log
    # then takes the translogger's place)
    assert re.search(r'^200 "GET /\?own-logs HTTP/1.1" took \d+ us$', serve("/?own-logs"), re.M)
    assert "Ready to handle requests" in event_log.read_text()  # errorlog, Zope's too
    assert not buildout.path("var", "log", "gunicorn.log").exists()
    assert not buildout.path("var", "log", "gunicorn-access.log").exists()

    # The same settings on the command line, and syslog.
    access_log = buildout.path("cli-access.log")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as syslog:
        syslog.bind(("127.0.0.1", 0))
        stdout = serve("/?command-line", "--access-logfile", str(access_log), "--log-syslog",
                       "--log-syslog-to", "udp://127.0.0.1:%d" % syslog.getsockname()[1])
        received = datagrams_until(syslog, b'200 "GET /?command-line HTTP/1.1" took')
    assert "/?command-line" not in stdout
    assert '200 "GET /?command-line HTTP/1.1" took' in access_log.read_text()
    assert b"Ready to handle requests" in received, received


def test_script_mode_serves_the_instance_pipeline(new_buildout, servers):
    address = f"127.0.0.1:{free_port()}"
    buildout = new_buildout("scriptpipeline", f"""
        [buildout]
        extends = {REPO}/buildout.cfg

        [instance]
        pipeline =
            translogger
            egg:Paste#gzip
            egg:Zope#httpexceptions
            zope

        [gunicorn]
        mode = script
        bind = {address}
    """)
    buildout.run()
    server = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="script")
    assert wait_until_serving(server, address) == 200
    host, port = address.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/", headers={"Accept-Encoding": "gzip"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.getheader("Content-Encoding") == "gzip"  # the pipeline's filter
    assert b"<html" in gzip.decompress(body).lower()
    assert server.stop() == 0


PROBE = "plone_recipe_gunicorn_probe"


def _wheel(directory, name, version="1.0"):
    """A one-module wheel written by hand: a distribution no index has."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": "",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n"),
    }
    files[f"{dist_info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"])
    with zipfile.ZipFile(directory / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def _forget_probe():
    for path in [*EGGS.glob(f"{PROBE}-*"), *EGGS.glob(f"*/{PROBE}-*")]:  # eggs/v5/ too
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("section, option", [
    ("gunicorn", "find-links"), ("instance", "find-links"), ("gunicorn", "index")])
def test_part_eggs_are_found_where_the_part_or_its_instance_says(
        new_buildout, tmp_path, section, option):
    # A private egg, found through the part's find-links or index, else the
    # instance's, as zc.recipe.egg reads them.  [buildout]'s index is empty:
    # found there it would prove nothing (and PyPI is not asked).
    (tmp_path / "empty").mkdir()
    project = tmp_path / "private" / PROBE.replace("_", "-")  # a simple index
    project.mkdir(parents=True)
    _wheel(project, PROBE)
    where = project if option == "find-links" else project.parent
    buildout = new_buildout(f"{option}-{section}", f"""
        [buildout]
        extends = {REPO}/buildout.cfg
        index = {(tmp_path / "empty").as_uri()}

        [gunicorn]
        eggs = {PROBE}

        [{section}]
        {option} = {where.as_uri()}
    """)
    _forget_probe()  # installed by an earlier run, it would be found anyway
    try:
        buildout.run()
        script = buildout.path("bin", "gunicorn-instance").read_text()
    finally:
        _forget_probe()
    assert f"/{PROBE}-1.0-" in script
