"""Zope over ZEO served by gunicorn, against waitress, bjoern and the limits.

    make bench                              the full run (about 20 minutes)
    python3 benchmarks/bench.py --quick     short durations: development, smoke test
    python3 benchmarks/bench.py --zope-criteria
                                            Zope's own test: 100 connections, 100 s, "/"

One buildout in benchmarks/work/ (git-ignored) extends the repository's
gunicorn.cfg (ZEO) with two gunicorn parts that keep the recipe's defaults (ini
and script mode), a bjoern instance (dataflake.wsgi.bjoern) and a gunicorn
serving a hello-world app.  It
shares the repository's eggs directory and listens on 127.0.0.1:18080 (HTTP)
and 127.0.0.1:18100 (ZEO), away from the test suite's ports.

The ZEO server runs throughout; the HTTP servers run one after the other, each
restarted for every round (the order rotates between rounds, so a noisy
neighbour does not always hit the same server).  Each round begins with the
servers the targets compare, back to back: waitress, the default
configuration, bjoern, the hello-world app with the default's workers and
Zope in process; they get 5 rounds, the others 3.  Ratios are taken within a
round and their median reported: the speed of a shared machine drifts
between rounds far more than within one.  Every start measures the
time to the first 200; then, after warm-up, wrk loads "/" and the ZMI
(/manage_main, basic auth), and a mixed workload sends steady, paced fast
requests to "/" while a few slow ones (a DTML method that computes for about
300 ms) are in flight.  Medians over the rounds are reported, with ratios to
waitress, to the hello-world ceiling with the same workers, and to the compute
limit (Zope's in-process publish rate on one core, times the cores).

Results: a table on stdout, benchmarks/results/<mode>.json and .txt, and a
PNG plot of throughput against workers (matplotlib in its own virtualenv
under benchmarks/work/, created on first use).  The last line printed is
``gunicorn/waitress throughput ratio: R`` for the default ZEO configuration.

Every process started here runs in its own session and is stopped with its
whole process group when its measurement ends, and also when the run fails
or is interrupted.
"""

import argparse
import ast
import base64
import configparser
import http.client
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "results"
LOGS = WORK / "logs"
PLOTENV = WORK / "plotenv"
LUA = HERE / "report.lua"

HOST, PORT, ZEO_PORT = "127.0.0.1", 18080, 18100
ADMIN = "Basic " + base64.b64encode(b"admin:admin").decode()
CORES = os.cpu_count() or 1
PATHS = {"root": ("/", None), "zmi": ("/manage_main", ADMIN)}
# The worker classes behind the kinds the tables name: the recipe's
# (src/plone/recipe/gunicorn/worker.py), the ones its defaults choose, for
# Zope and for hello world alike.
WORKER_CLASSES = {"sync": "plone.recipe.gunicorn.worker.SyncWorker",
                  "gthread": "plone.recipe.gunicorn.worker.ThreadWorker"}
WORKER_KINDS = {uri: kind for kind, uri in WORKER_CLASSES.items()}
SLOW_PAGE = "bench_slow"
SLOW_SECONDS = 0.3
NOISY = 0.10  # other programs' share of the CPU above which a run is flagged
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    rounds: int           # every server
    target_rounds: int    # the servers the targets compare (TARGET_GROUP): more rounds
    seconds: int          # one wrk run against one path; one in-process run
    warmup: int           # per path, after every start
    mixed: int            # the mixed workload
    criteria: int         # the --zope-criteria run
    connections: int = 20
    wrk_threads: int = 2


FULL = Timing(rounds=3, target_rounds=5, seconds=5, warmup=2, mixed=8, criteria=100)
QUICK = Timing(rounds=1, target_rounds=1, seconds=2, warmup=1, mixed=3, criteria=5)

# What the targets compare, measured back to back at the start of every round:
# the default configuration and its comparators, then the hello-world app with
# the default's workers and Zope in process.  A ratio is taken within
# each round and the median of those is reported, so that a change of the
# machine's speed between rounds (common on a shared machine: the same
# server's rounds differ by up to 2x) cancels out of the ratios.
TARGET_GROUP = ("waitress", "gunicorn-ini", "bjoern")

# The mixed workload: fast requests on FAST_CONNECTIONS connections, each
# pausing FAST_PAUSE_MS after an answer (a steady load every server can
# carry), while SLOW_CLIENTS clients each fetch the slow page, then wait
# SLOW_PAUSE seconds.
FAST_CONNECTIONS, FAST_PAUSE_MS = 10, 40
SLOW_CLIENTS, SLOW_PAUSE = 2, 0.5

BUILDOUT_CFG = """\
# Written by benchmarks/bench.py; rewritten at every run.
[buildout]
extends = {repo}/gunicorn.cfg
directory = {work}
develop = {repo}
eggs-directory = {repo}/eggs
parts =
    zeoserver
    instance
    gunicorn-ini
    gunicorn-script
    bjoern
    hello

[versions]
bjoern = 3.2.2
dataflake.wsgi.bjoern = 2.2

[zeoserver]
zeo-address = {host}:{zeo_port}

[instance]
http-address = {host}:{port}

# The default ZEO configuration: the recipe's defaults, in both modes.
# (Not gunicorn.cfg's [gunicorn]: that one sets workers = 2.)  The worker
# matrix runs bin/gunicorn-ini-instance with gunicorn arguments.
[gunicorn-ini]
recipe = plone.recipe.gunicorn
mode = ini

[gunicorn-script]
recipe = plone.recipe.gunicorn
mode = script

# The same Zope served by bjoern, for comparison only.
[bjoern]
<= instance
eggs =
    ${{instance:eggs}}
    dataflake.wsgi.bjoern
wsgi-ini-template = {work}/bjoern.ini.in

# gunicorn itself, to serve benchmarks/hello.py: the ceiling.
[hello]
recipe = zc.recipe.egg
eggs = gunicorn
scripts = gunicorn=hello-gunicorn
extra-paths =
    {here}
    {repo}/src
"""

# plone.recipe.zope2instance's wsgi-ini-template: its variables, %-formatted.
BJOERN_INI = """\
# Written by benchmarks/bench.py: bjoern serves the same pipeline as bin/instance.
[server:main]
use = egg:dataflake.wsgi.bjoern#main
listen = %(http_address)s

[app:zope]
use = egg:Zope#main
zope_conf = %(location)s/etc/zope.conf

[filter:translogger]
use = egg:Paste#translogger
setup_console_handler = False

[pipeline:main]
pipeline =
    %(pipeline)s

[loggers]
keys = root, wsgi

[handlers]
keys = console, accesslog, eventlog

[formatters]
keys = generic, message

[logger_root]
level = %(eventlog_level)s
handlers = %(root_handlers)s

[logger_wsgi]
level = %(accesslog_level)s
handlers = accesslog
qualname = wsgi
propagate = 0

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[handler_accesslog]
class = %(accesslog_handler)s
args = %(accesslog_args)s
kwargs = %(accesslog_kwargs)s
level = %(accesslog_level)s
formatter = message

[handler_eventlog]
class = %(eventlog_handler)s
args = %(eventlog_args)s
kwargs = %(eventlog_kwargs)s
level = NOTSET
formatter = generic

[formatter_generic]
format = %%(asctime)s %%(levelname)-7.7s [%%(name)s] %%(message)s

[formatter_message]
format = %%(message)s
"""

# A page that computes for a while: DTML iterating over a range.
SLOW_DTML = """<dtml-in expr="_.range(_.int(REQUEST.get('n', 1000)))"></dtml-in>slow"""


class BenchError(Exception):
    """A step failed; the message says which and where to look."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------

class Processes:
    """Every process the bench starts, each in its own session; all stopped at the end."""

    def __init__(self):
        self.running = []

    def start(self, argv, name):
        LOGS.mkdir(parents=True, exist_ok=True)
        path = LOGS / f"{name}.log"
        out = open(path, "w")
        proc = subprocess.Popen(
            [str(a) for a in argv], cwd=WORK, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
        proc.log_path, proc.log_file, proc.name = path, out, name
        self.running.append(proc)
        return proc

    def stop(self, proc, timeout=20):
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _killpg(proc.pid, signal.SIGKILL)  # workers or helpers left in the group
        proc.wait()
        proc.log_file.close()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self):
        for proc in reversed(list(self.running)):
            self.stop(proc, timeout=10)


def _killpg(pgid, signum):
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def output_tail(proc, lines=25):
    proc.log_file.flush()
    text = proc.log_path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


# -- HTTP -----------------------------------------------------------------------

def request(path, auth=None, method="GET", body=None, timeout=60):
    """One request on a new connection; (status, body)."""
    conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    headers = {"Connection": "close"}
    if auth:
        headers["Authorization"] = auth
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def listening(port, host=HOST):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_port_free(port, timeout=30):
    deadline = time.monotonic() + timeout
    while listening(port):
        if time.monotonic() > deadline:
            raise BenchError(f"{HOST}:{port} is still in use {timeout}s after the last server stopped")
        time.sleep(0.1)


def wrk(procs, path, auth, seconds, connections, threads, pause_ms=None, timeout=10):
    """One wrk run; its JSON line as a dict, plus requests/s and error count."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", f"{timeout}s", "-s", str(LUA)]
    if auth:
        argv += ["-H", f"Authorization: {auth}"]
    argv.append(f"http://{HOST}:{PORT}{path}")
    env = dict(os.environ)
    env.pop("WRK_PAUSE_MS", None)
    if pause_ms:
        env["WRK_PAUSE_MS"] = str(pause_ms)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    procs.running.append(proc)
    try:
        out, _ = proc.communicate(timeout=seconds + timeout + 30)
    finally:
        if proc.poll() is None:
            _killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        procs.running.remove(proc)
    line = next((l for l in out.splitlines() if l.startswith("WRK-JSON ")), None)
    if line is None:
        raise BenchError(f"wrk printed no result:\n{out}")
    result = json.loads(line[len("WRK-JSON "):])
    result["rps"] = result["requests"] / result["duration_s"]
    result["errors"] = sum(result[k] for k in ("non2xx", "connect", "read", "write", "timeout"))
    return result


def cpu_seconds(pids):
    """CPU time (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def machine_busy_seconds():
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def accounted(run, pids):
    """``run()`` (a wrk result) with the CPU it cost the server, and what others took meanwhile.

    ``cpu_ms_per_request`` does not depend on how much of the machine other
    programs leave us; ``others_cpu`` is their share of all cores in the
    meantime (0 on a quiet machine): the noise of that measurement.
    ``load_cpu_s`` is what the load generator (wrk, and this script) used.
    """
    def snapshot():
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return (time.monotonic(), cpu_seconds(pids), machine_busy_seconds(),
                children.ru_utime + children.ru_stime + me.ru_utime + me.ru_stime)

    t0, server0, busy0, ours0 = snapshot()
    result = run()
    t1, server1, busy1, ours1 = snapshot()
    server, load = server1 - server0, ours1 - ours0
    result["server_cpu_s"] = server
    result["load_cpu_s"] = load
    result["cpu_ms_per_request"] = 1000 * server / result["requests"] if result["requests"] else None
    result["others_cpu"] = max(0.0, (busy1 - busy0) - server - load) / ((t1 - t0) * CORES)
    return result


# -- tools and build ---------------------------------------------------------------

def ensure_tools():
    """wrk to load, libev-dev to compile bjoern: from Debian, if missing."""
    missing = []
    if not shutil.which("wrk"):
        missing.append("wrk")
    if not Path("/usr/include/ev.h").exists():
        missing.append("libev-dev")
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"cannot install {' '.join(missing)} ({exc}); install them with apt-get")


def build():
    """Write the bench buildout and run it (-N: reuses what is installed)."""
    buildout = REPO / ".venv" / "bin" / "buildout"
    if not buildout.exists():
        log("creating .venv (make .venv/.installed)")
        subprocess.run(["make", ".venv/.installed"], cwd=REPO, check=True)
    WORK.mkdir(parents=True, exist_ok=True)
    _write(WORK / "buildout.cfg", BUILDOUT_CFG.format(
        repo=REPO, work=WORK, here=HERE, host=HOST, port=PORT, zeo_port=ZEO_PORT))
    _write(WORK / "bjoern.ini.in", BJOERN_INI)
    log("buildout -N (benchmarks/work/buildout.log)")
    with open(WORK / "buildout.log", "w") as out:
        status = subprocess.run([str(buildout), "-N", "-c", "buildout.cfg"], cwd=WORK,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if status.returncode:
        tail = "\n".join((WORK / "buildout.log").read_text().splitlines()[-30:])
        raise BenchError(f"buildout failed in {WORK}:\n{tail}")
    # Access logs of earlier runs: every request is logged; start afresh.
    for path in (WORK / "var" / "log").glob("*.log"):
        path.write_text("")


def _write(path, text):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


# -- servers --------------------------------------------------------------------

@dataclass
class Server:
    key: str
    label: str
    argv: list
    app: str = "zope"             # or "hello"
    family: str = ""              # "gunicorn", "waitress", "bjoern"
    workers: int = 1
    worker_class: str = "sync"
    threads: int = 1
    ready_line: str = ""          # printed once per worker when it serves
    default: bool = False

    @property
    def shape(self):
        return (self.workers, self.worker_class, self.threads)

    @property
    def shape_text(self):
        if self.family == "waitress":
            return f"1 proc x {self.threads} thr"
        if self.family == "bjoern":
            return "1 proc, 1 thr"
        return f"{self.workers} {self.worker_class} x {self.threads} thr"


def gunicorn_settings(part):
    """workers, worker class, threads and keep-alive a part's generated files configure."""
    location = WORK / "parts" / part
    if (location / "gunicorn.ini").exists():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(location / "gunicorn.ini")
        raw = {k: v for k, v in parser.items("server:main")}
    else:
        raw = {}
        tree = ast.parse((location / "gunicorn.conf.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                try:
                    raw[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    threads = int(raw.get("threads", 1))
    worker_class = worker_kind(str(raw.get("worker_class", "sync")), threads)
    return {"workers": int(raw.get("workers", 1)), "worker_class": worker_class,
            "threads": threads, "keepalive": int(raw.get("keepalive", 2)),
            "timeout": int(raw.get("timeout", 30))}


def worker_kind(worker_class, threads):
    """The kind the tables name for a worker class ("sync", "gthread", ...);
    sync with more than one thread is gthread, as gunicorn itself decides."""
    kind = WORKER_KINDS.get(worker_class, worker_class)
    return "gthread" if kind == "sync" and threads > 1 else kind


def instance_threads():
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(WORK / "parts" / "instance" / "etc" / "wsgi.ini")
    return int(parser.get("server:main", "threads", fallback="4"))


def zope_servers():
    ready = "Ready to handle requests"
    ini, script = gunicorn_settings("gunicorn-ini"), gunicorn_settings("gunicorn-script")
    threads = instance_threads()
    servers = [
        Server("waitress", "waitress (bin/instance console)", ["bin/instance", "console"],
               family="waitress", threads=threads),
        Server("gunicorn-ini", "gunicorn ini, recipe defaults (DEFAULT)", ["bin/gunicorn-ini-instance"],
               family="gunicorn", workers=ini["workers"], worker_class=ini["worker_class"],
               threads=ini["threads"], ready_line=ready, default=True),
        Server("gunicorn-script", "gunicorn script, recipe defaults",
               ["bin/gunicorn-script-instance"], family="gunicorn",
               workers=script["workers"], worker_class=script["worker_class"],
               threads=script["threads"], ready_line=ready),
    ]
    for worker_class in ("sync", "gthread"):
        for workers in sorted({1, 2, CORES + 1}):
            t = 1 if worker_class == "sync" else threads
            servers.append(Server(
                f"{worker_class}-w{workers}", f"gunicorn -w {workers} -k {worker_class} --threads {t}",
                ["bin/gunicorn-ini-instance", "-w", workers, "-k", WORKER_CLASSES[worker_class],
                 "--threads", t],
                family="gunicorn", workers=workers, worker_class=worker_class, threads=t,
                ready_line=ready))
    servers.append(Server("bjoern", "bjoern (dataflake.wsgi.bjoern)", ["bin/bjoern", "console"],
                          family="bjoern"))
    return servers


def variant(text):
    """A Server for ``KEY=ARGS``: the recipe's defaults with more gunicorn arguments."""
    key, _, args = text.partition("=")
    argv = args.split()
    shape = gunicorn_settings("gunicorn-ini")
    options = {"-w": "workers", "--workers": "workers", "-k": "worker_class",
               "--worker-class": "worker_class", "--threads": "threads"}
    for flag, value in zip(argv, argv[1:]):
        if flag in options:
            shape[options[flag]] = value if options[flag] == "worker_class" else int(value)
    shape["worker_class"] = worker_kind(shape["worker_class"], shape["threads"])
    return Server(key, f"gunicorn {args}", ["bin/gunicorn-ini-instance", *argv], family="gunicorn",
                  workers=shape["workers"], worker_class=shape["worker_class"],
                  threads=shape["threads"], ready_line="Ready to handle requests")


def ceiling_key(server):
    """The key of the hello-world server with a Zope server's worker shape
    (a Server, or its summary)."""
    shape = server if isinstance(server, dict) else server.__dict__
    return f"hello-{shape['worker_class']}-w{shape['workers']}-t{shape['threads']}"


def target_keys(default):
    """Keys of the servers the targets compare: TARGET_GROUP, then the
    hello-world app with the default's workers (``default``: a Server or its
    summary, None when the run has no default)."""
    return [*TARGET_GROUP, ceiling_key(default)] if default else list(TARGET_GROUP)


def hello_servers(zope):
    """gunicorn serving hello.py, once for every worker shape the Zope servers use."""
    keepalive = gunicorn_settings("gunicorn-ini")["keepalive"]
    shapes = sorted({s.shape for s in zope if s.family == "gunicorn"})
    return [Server(
        f"hello-{k}-w{w}-t{t}", f"hello world: gunicorn -w {w} -k {k} --threads {t}",
        ["bin/hello-gunicorn", "-b", f"{HOST}:{PORT}", "--control-socket", WORK / "var" / "hello.ctl",
         "--keep-alive", keepalive, "-w", w, "-k", WORKER_CLASSES.get(k, k), "--threads", t,
         "hello:app"],
        app="hello", family="gunicorn", workers=w, worker_class=k, threads=t,
        ready_line="Booting worker with pid") for (w, k, t) in shapes]


def start_server(procs, server, timeout=120):
    """Start a server; return (process, seconds to its first 200) once every worker serves."""
    wait_port_free(PORT)
    began = time.monotonic()
    proc = procs.start(server.argv, server.key)
    startup = None
    deadline = began + timeout
    while startup is None:
        if proc.poll() is not None:
            raise BenchError(f"{server.label} exited with {proc.returncode}:\n{output_tail(proc)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{server.label} gave no 200 in {timeout}s:\n{output_tail(proc)}")
        try:
            status, _ = request("/", timeout=timeout)
            if status == 200:
                startup = time.monotonic() - began
        except (OSError, http.client.HTTPException):
            time.sleep(0.05)
    # Measure the steady state: wait until every worker has loaded its application.
    if server.ready_line:
        wait_for_output(proc, server.ready_line, server.workers, deadline,
                        f"{server.label}: not all {server.workers} workers came up")
    return proc, startup


def wait_for_output(proc, text, count, deadline, failure):
    """Wait until ``text`` is ``count`` times in the process's output."""
    while output(proc).count(text) < count:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise BenchError(f"{failure}:\n{output_tail(proc)}")
        time.sleep(0.1)


def output(proc):
    proc.log_file.flush()
    return proc.log_path.read_text(errors="replace")


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def worker_pids(server, pid):
    if server.family != "gunicorn":
        return [pid]
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# -- measurements -------------------------------------------------------------------

def measure_round(procs, server, timing, slow_n):
    """Start the server, measure it, stop it: one round's figures."""
    proc, startup = start_server(procs, server)
    try:
        paths = PATHS if server.app == "zope" else {"root": PATHS["root"]}
        for path, auth in paths.values():
            wrk(procs, path, auth, timing.warmup, timing.connections, timing.wrk_threads)
        workers = worker_pids(server, proc.pid)
        pids = sorted({proc.pid, *workers})
        result = {"startup_s": startup, "loadavg": _loadavg(), "paths": {}}
        for name, (path, auth) in paths.items():
            result["paths"][name] = accounted(lambda: wrk(
                procs, path, auth, timing.seconds, timing.connections, timing.wrk_threads), pids)
        if server.app == "zope":
            result["mixed"] = mixed(timing.mixed, slow_n, procs)
        result["rss_kb"] = [rss_kb(pid) for pid in workers]
        result["master_rss_kb"] = rss_kb(proc.pid) if server.family == "gunicorn" else None
        return result
    finally:
        procs.stop(proc)


def mixed(seconds, slow_n, procs):
    """Paced fast requests to "/" while slow ones are in flight."""
    stop = threading.Event()
    slow = {"latencies_ms": [], "errors": 0}

    def slow_client():
        while not stop.is_set():
            began = time.monotonic()
            try:
                status, _ = request(f"/{SLOW_PAGE}?n={slow_n}", timeout=60)
                ok = status == 200
            except (OSError, http.client.HTTPException):
                ok = False
            if ok:
                slow["latencies_ms"].append((time.monotonic() - began) * 1000)
            else:
                slow["errors"] += 1
            stop.wait(SLOW_PAUSE)

    clients = [threading.Thread(target=slow_client, daemon=True) for _ in range(SLOW_CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(0.2)  # the slow requests are in flight when the fast ones begin
        fast = wrk(procs, "/", None, seconds, FAST_CONNECTIONS, 1, pause_ms=FAST_PAUSE_MS)
    finally:
        stop.set()
        for client in clients:
            client.join(70)
    latencies = slow["latencies_ms"]
    return {"fast": fast, "slow": {
        "count": len(latencies), "errors": slow["errors"],
        "p50_ms": statistics.median(latencies) if latencies else None,
        "max_ms": max(latencies) if latencies else None}}


def inprocess_round(procs, timing):
    """Zope's in-process publish rate, per path: {path: {rps, cpu_ms_per_request}}.

    ``rps`` is one process alone, the rate on one core.  ``together`` adds up
    the rates of one process per core publishing at the same time: whether
    the cores reach the compute limit (cores x the one-core rate) together."""
    alone = inprocess_processes(procs, timing, 1)[0]
    together = inprocess_processes(procs, timing, CORES)
    return {name: {**rates, "together": sum(p[name]["rps"] for p in together)}
            for name, rates in alone.items()}


def inprocess_processes(procs, timing, count):
    """Run inprocess.py in ``count`` processes that measure at the same moment."""
    argv = [WORK / "parts" / "instance" / "bin" / "interpreter", HERE / "inprocess.py",
            WORK / "parts" / "instance" / "etc" / "zope.conf", timing.seconds, "--wait"]
    children = [procs.start(argv, f"inprocess-{i + 1}") for i in range(count)]
    try:
        deadline = time.monotonic() + 120
        for child in children:  # each one warm, then all of them go
            wait_for_output(child, "READY", 1, deadline, "inprocess.py did not get ready")
        for child in children:
            child.send_signal(signal.SIGUSR1)
        results = []
        for child in children:
            child.wait(300)
            line = next((l for l in output(child).splitlines()
                         if l.startswith("INPROCESS-JSON ")), None)
            if line is None:
                raise BenchError(f"inprocess.py failed:\n{output_tail(child)}")
            results.append(json.loads(line[len("INPROCESS-JSON "):]))
        return results
    finally:
        for child in children:
            procs.stop(child)


def compute_limit(samples):
    """Medians of the in-process rounds; the limit is the rate on one core times the cores."""
    result = {}
    for name in PATHS:
        rates = [sample[name]["rps"] for sample in samples]
        result[name] = {"per_core": statistics.median(rates),
                        "limit": statistics.median(rates) * CORES,
                        "together": statistics.median(sample[name]["together"] for sample in samples),
                        "together_over_limit": statistics.median(
                            sample[name]["together"] / (sample[name]["rps"] * CORES)
                            for sample in samples),
                        "cpu_ms_per_request": statistics.median(
                            sample[name]["cpu_ms_per_request"] for sample in samples)}
    return result


def prepare_content(procs):
    """The slow page in the ZODB, sized to take about SLOW_SECONDS; returns its n."""
    waitress = zope_servers()[0]
    proc, _ = start_server(procs, waitress)
    try:
        status, _ = request(f"/{SLOW_PAGE}?n=1")
        if status == 404:
            body = urllib.parse.urlencode(
                {"id": SLOW_PAGE, "title": "bench: computes for a while", "file": SLOW_DTML})
            status, text = request("/manage_addProduct/OFSP/addDTMLMethod", ADMIN, "POST", body)
            if status not in (200, 302):
                raise BenchError(f"could not add /{SLOW_PAGE}: {status} {text[:300]!r}")
        probe = 2000
        for _ in range(2):  # warm-up
            request(f"/{SLOW_PAGE}?n={probe}")
        times = []
        for _ in range(3):
            began = time.monotonic()
            status, _ = request(f"/{SLOW_PAGE}?n={probe}")
            if status != 200:
                raise BenchError(f"/{SLOW_PAGE} answered {status}")
            times.append(time.monotonic() - began)
        n = max(1, round(probe * SLOW_SECONDS / statistics.median(times)))
        began = time.monotonic()
        request(f"/{SLOW_PAGE}?n={n}")
        log(f"slow page: /{SLOW_PAGE}?n={n} took {1000 * (time.monotonic() - began):.0f} ms alone")
        return n
    finally:
        procs.stop(proc)


# -- aggregation and report --------------------------------------------------------------

def median_of(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(server, rounds):
    ok = [r for r in rounds if "failed" not in r]
    summary = {"label": server.label, "family": server.family, "app": server.app,
               "workers": server.workers, "worker_class": server.worker_class,
               "threads": server.threads, "shape": server.shape_text, "default": server.default,
               "rounds": len(ok), "failures": [r["failed"] for r in rounds if "failed" in r]}
    if not ok:
        return summary
    for name in ok[0]["paths"]:
        runs = [r["paths"][name] for r in ok]
        summary[name] = {
            "rps": median_of([r["rps"] for r in runs]),
            "p50_ms": median_of([r["p50_ms"] for r in runs]),
            "p99_ms": median_of([r["p99_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "cpu_ms_per_request": median_of([r["cpu_ms_per_request"] for r in runs]),
            "others_cpu": median_of([r["others_cpu"] for r in runs]),
            "requests": sum(r["requests"] for r in runs),
        }
    errors = sum(summary[name]["errors"] for name in ok[0]["paths"])
    if "mixed" in ok[0]:
        summary["mixed"] = {
            "fast_rps": median_of([r["mixed"]["fast"]["rps"] for r in ok]),
            "fast_p50_ms": median_of([r["mixed"]["fast"]["p50_ms"] for r in ok]),
            "fast_p99_ms": median_of([r["mixed"]["fast"]["p99_ms"] for r in ok]),
            "slow_p50_ms": median_of([r["mixed"]["slow"]["p50_ms"] for r in ok]),
            "slow_count": sum(r["mixed"]["slow"]["count"] for r in ok),
            "errors": sum(r["mixed"]["fast"]["errors"] + r["mixed"]["slow"]["errors"] for r in ok),
        }
        errors += summary["mixed"]["errors"]
    summary["errors"] = errors + len(summary["failures"])
    summary["startup_s"] = median_of([r["startup_s"] for r in ok])
    per_worker = [statistics.mean(r["rss_kb"]) / 1024 for r in ok if r["rss_kb"] and None not in r["rss_kb"]]
    summary["rss_mb_per_worker"] = median_of(per_worker)
    summary["master_rss_mb"] = median_of([r["master_rss_kb"] / 1024 for r in ok if r.get("master_rss_kb")])
    return summary


def paired(rounds_a, rounds_b, value_a, value_b=None):
    """Median over the rounds measured for both of value_a(a) / value_b(b)."""
    value_b = value_b or value_a
    b_by_round = {r["round"]: r for r in rounds_b if "failed" not in r}
    ratios = []
    for a in rounds_a:
        b = b_by_round.get(a["round"])
        if "failed" in a or b is None:
            continue
        top, bottom = value_a(a), value_b(b)
        if top is not None and bottom:
            ratios.append(top / bottom)
    return median_of(ratios)


def root_rps(r):
    return r["paths"]["root"]["rps"]


def add_ratios(summaries, rounds, inprocess, servers):
    """Ratios of every Zope server to waitress, its ceiling and the compute limit:
    medians of the ratios within each round (see TARGET_GROUP)."""
    waitress = rounds.get("waitress", [])
    limit = [{"round": r["round"], "limit": r["root"]["rps"] * CORES} for r in inprocess]
    for server in servers:
        s = summaries[server.key]
        if "root" not in s or server.app != "zope":
            continue
        mine = rounds[server.key]
        s["x_waitress"] = paired(mine, waitress, root_rps)
        s["x_compute"] = paired(mine, limit, root_rps, lambda r: r["limit"])
        if server.family == "gunicorn":
            hello = rounds.get(ceiling_key(server), [])
            s["x_ceiling"] = paired(mine, hello, root_rps)
            s["x_ceiling_at_most"] = ceiling_bound(hello, inprocess)


def ceiling_bound(hello_rounds, inprocess):
    """The highest share of the hello-world ceiling a Zope server could reach
    in this run: median over the rounds of the rate the cores would give if
    every request cost only what Zope costs in process (alone on a core, its
    caches hot) plus what hello world's whole request costs its server and
    the load generator, over hello world's rate.  None without figures."""
    zope_ms = {r["round"]: r["root"]["cpu_ms_per_request"] for r in inprocess}
    bounds = []
    for r in hello_rounds:
        root = r.get("paths", {}).get("root")
        if r["round"] not in zope_ms or not root or not root["requests"]:
            continue
        hello_ms = 1000 * (root["server_cpu_s"] + root["load_cpu_s"]) / root["requests"]
        bounds.append(CORES * 1000 / (zope_ms[r["round"]] + hello_ms) / root["rps"])
    return median_of(bounds)


def fmt(value, spec="{:.0f}", none="-"):
    return none if value is None else spec.format(value)


COLUMNS = [  # heading, width, value of a summary
    ("req/s", 6, lambda s: fmt(s["root"]["rps"])),
    ("p50", 6, lambda s: fmt(s["root"]["p50_ms"], "{:.1f}")),
    ("p99", 6, lambda s: fmt(s["root"]["p99_ms"], "{:.1f}")),
    ("err", 4, lambda s: str(s["errors"])),
    ("ZMI/s", 6, lambda s: fmt(s.get("zmi", {}).get("rps"))),
    ("ZMIp99", 6, lambda s: fmt(s.get("zmi", {}).get("p99_ms"))),
    ("mixp99", 6, lambda s: fmt(s.get("mixed", {}).get("fast_p99_ms"), "{:.1f}")),
    ("RSS/w", 5, lambda s: fmt(s["rss_mb_per_worker"])),
    ("start", 5, lambda s: fmt(s["startup_s"], "{:.2f}")),
    ("cpu/rq", 6, lambda s: fmt(s["root"]["cpu_ms_per_request"], "{:.2f}")),
    ("xwait", 5, lambda s: fmt(s.get("x_waitress"), "{:.2f}")),
    ("xceil", 5, lambda s: fmt(s.get("x_ceiling"), "{:.2f}")),
    ("%comp", 5, lambda s: fmt(s.get("x_compute") and 100 * s["x_compute"])),
    ("oth%", 4, lambda s: fmt(100 * s["root"]["others_cpu"])),
]


def table(summaries, compute):
    head = f"{'server':<40} {'workers':<19} " + " ".join(f"{h:>{w}}" for h, w, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for s in summaries.values():
        if "root" not in s:
            lines.append(f"{s['label'][:40]:<40} FAILED: {s['failures'][:1]}")
            continue
        lines.append(f"{s['label'][:40]:<40} {s['shape']:<19} "
                     + " ".join(f"{value(s):>{w}}" for _, w, value in COLUMNS))
    root, zmi = compute["root"], compute["zmi"]
    lines.append(f"{'Zope in process, one thread':<40} {'(compute limit)':<19} "
                 f"{root['per_core']:>6.0f} {'':>6} {'':>6} {'':>4} {zmi['per_core']:>6.0f} "
                 f"{'':>6} {'':>6} {'':>5} {'':>5} {root['cpu_ms_per_request']:>6.2f}")
    lines.append(f"{f'Zope in process, {CORES} at once':<40} {f'{CORES} procs x 1 thr':<19} "
                 f"{root['together']:>6.0f} {'':>6} {'':>6} {'':>4} {zmi['together']:>6.0f}")
    lines += ["", f"Zope in process on {CORES} cores at once: {root['together_over_limit']:.2f} "
                  "of the compute limit (median of the ratios within each round)."]
    lines += ["",
              "req/s, p50, p99 (ms): wrk -c20 on /, median of the rounds. err: non-2xx answers and",
              "socket errors, all runs. ZMI: /manage_main with basic auth. mixp99: p99 (ms) of paced",
              "fast requests while slow pages are in flight. RSS/w: MB per worker process. start:",
              "seconds to the first 200. cpu/rq: CPU ms the server spent per request on / (does not",
              "depend on the share of the machine others leave us). xwait: req/s over waitress's.",
              "xceil: over hello world with the same workers. %comp: share of the compute limit",
              f"(in-process rate on one core x {CORES} cores = {root['limit']:.0f} req/s). xwait, xceil",
              "and %comp are medians of the ratios within each round. oth%: CPU other programs on",
              "this machine used meanwhile, share of all cores (noise). Zope in process, at once:",
              "one process per core publishing at the same time, their rates added up: whether",
              "the cores reach the compute limit together. The ceiling target's \"at most\": the",
              "share Zope would reach if each request cost the cores only Zope's CPU in process plus",
              "hello world's whole request (its server's CPU and wrk's), median of the rounds."]
    return "\n".join(lines)


def targets(summaries, rounds):
    """The issue's targets for the default ZEO configuration: [(text, met)].

    Every comparison is the median of the ratios within each round."""
    d, w, b = summaries.get("gunicorn-ini"), summaries.get("waitress"), summaries.get("bjoern")
    if not d or "root" not in d:
        return [("default configuration measured", False)]
    mine = rounds["gunicorn-ini"]
    checks = []

    def check(text, value, bound, ok):
        checks.append((f"{text}: {fmt(value, '{:.2f}')} (target {bound})",
                       value is not None and bool(ok(value))))

    def root_p99(r):
        return r["paths"]["root"]["p99_ms"]

    def mixed_p99(r):
        return r["mixed"]["fast"]["p99_ms"]

    if w and "root" in w:
        check("req/s over waitress", d["x_waitress"], ">= 2.0", lambda v: v >= 2.0)
        check("p99 over waitress's", paired(mine, rounds["waitress"], root_p99), "<= 0.6",
              lambda v: v <= 0.6)
        check("mixed fast p99 over waitress's", paired(mine, rounds["waitress"], mixed_p99),
              "<= 1.0", lambda v: v <= 1.0)
    if b and "root" in b:
        check("req/s over bjoern", paired(mine, rounds["bjoern"], root_rps), ">= 1.0",
              lambda v: v >= 1.0)
        check("mixed fast p99 over bjoern's", paired(mine, rounds["bjoern"], mixed_p99), "<= 0.5",
              lambda v: v <= 0.5)
    checks.append((f"errors: {d['errors']} (target 0)", d["errors"] == 0))
    if d.get("x_compute") is not None:
        check("share of the compute limit", d["x_compute"], ">= 0.45", lambda v: v >= 0.45)
    if d.get("x_ceiling") is not None:
        bound = d.get("x_ceiling_at_most")
        check("share of the hello-world ceiling", d["x_ceiling"],
              ">= 0.35" + (f"; at most {bound:.2f} here" if bound is not None else ""),
              lambda v: v >= 0.35)
    if w and w.get("startup_s"):
        check("start-up over bin/instance console's",
              paired(mine, rounds["waitress"], lambda r: r["startup_s"]), "<= 1.2",
              lambda v: v <= 1.2)
    return checks


def rounds_table(result):
    """req/s on "/" of the target group, round by round: how much the machine drifted."""
    servers, rounds = result["servers"], result["rounds"]
    count = result["timing"]["target_rounds"]
    lines = ["req/s on / in each round (the ratios are taken within a round):",
             f"{'round':<40} " + " ".join(f"{r + 1:>6}" for r in range(count))]

    def row(label, by_round):
        lines.append(f"{label[:40]:<40} " + " ".join(
            f"{fmt(by_round.get(r)):>6}" for r in range(count)))

    for key in target_keys(servers.get("gunicorn-ini")):
        if key in servers:
            row(servers[key]["label"], {r["round"]: r["paths"]["root"]["rps"]
                                        for r in rounds[key] if "failed" not in r})
    row("Zope in process, one core", {r["round"]: r["root"]["rps"]
                                      for r in result.get("inprocess", [])})
    row(f"Zope in process, {CORES} at once", {r["round"]: r["root"]["together"]
                                             for r in result.get("inprocess", [])})
    return "\n".join(lines)


def environment():
    def version(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return None
    return {"cores": CORES, "python": platform.python_version(), "machine": platform.machine(),
            "wrk": version(["wrk", "-v"]), "loadavg_start": _loadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def _loadavg():
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


def plot(json_path, png_path):
    """Throughput against workers, drawn by plot.py with matplotlib from its own venv."""
    python = PLOTENV / "bin" / "python"
    if not python.exists():
        log("installing matplotlib into benchmarks/work/plotenv")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PLOTENV)], check=True)
            subprocess.run([str(PLOTENV / "bin" / "pip"), "install", "-q", "matplotlib"], check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            log(f"no plot: matplotlib could not be installed ({exc})")
            shutil.rmtree(PLOTENV, ignore_errors=True)
            return False
    result = subprocess.run([str(python), str(HERE / "plot.py"), str(json_path), str(png_path)],
                            capture_output=True, text=True)
    if result.returncode:
        log(f"no plot: {result.stderr.strip()[-500:]}")
        return False
    return True


# -- runs ---------------------------------------------------------------------------------

def run_bench(procs, timing, mode, only=None, variants=()):
    env = environment()
    slow_n = prepare_content(procs)
    zope = zope_servers() + variants
    if only:
        zope = [s for s in zope if s.key in only]
    servers = zope + hello_servers(zope)
    rounds = {s.key: [] for s in servers}
    inprocess = []
    group = target_group(servers)
    rest = [s for s in servers if s not in group]
    for r in range(max(timing.rounds, timing.target_rounds)):
        steps = []
        if r < timing.target_rounds:
            steps += rotated(group, r)
        if r < timing.rounds:
            steps += rotated(rest, r)
        for server in steps:
            if server is None:  # the in-process rate, measured in turn like a server
                log(f"round {r + 1}: Zope in process (compute limit)")
                inprocess.append({"round": r, **inprocess_round(procs, timing)})
                continue
            log(f"round {r + 1}: {server.label}")
            try:
                result = measure_round(procs, server, timing, slow_n)
            except BenchError as exc:
                log(f"  FAILED: {exc}")
                result = {"failed": str(exc)[:2000]}
            rounds[server.key].append({"round": r, **result})
    compute = compute_limit(inprocess)
    summaries = {s.key: summarise(s, rounds[s.key]) for s in servers}
    add_ratios(summaries, rounds, inprocess, servers)
    return {"mode": mode, "timing": timing.__dict__, "environment": env,
            "slow_page": {"path": f"/{SLOW_PAGE}?n={slow_n}", "target_ms": SLOW_SECONDS * 1000},
            "mixed_workload": {"fast_connections": FAST_CONNECTIONS, "fast_pause_ms": FAST_PAUSE_MS,
                               "slow_clients": SLOW_CLIENTS, "slow_pause_s": SLOW_PAUSE},
            "compute": compute, "servers": summaries, "rounds": rounds, "inprocess": inprocess}


def target_group(servers):
    """The servers the targets compare, in order; None stands for Zope in process."""
    by_key = {s.key: s for s in servers}
    return [by_key[k] for k in target_keys(by_key.get("gunicorn-ini")) if k in by_key] + [None]


def rotated(steps, r):
    shift = r % len(steps) if steps else 0
    return steps[shift:] + steps[:shift]


def run_criteria(procs, timing):
    """Zope's documented test: 100 concurrent connections for 100 s fetching "/"."""
    env = environment()
    zope = {s.key: s for s in zope_servers()}
    summaries = {}
    for key in ("gunicorn-ini", "waitress", "bjoern"):
        server = zope[key]
        log(f"zope criteria: {server.label}, {timing.criteria} s")
        proc, startup = start_server(procs, server)
        try:
            wrk(procs, "/", None, timing.warmup, 100, timing.wrk_threads, timeout=30)
            run = wrk(procs, "/", None, timing.criteria, 100, timing.wrk_threads, timeout=30)
        finally:
            procs.stop(proc)
        summaries[key] = {"label": server.label, "shape": server.shape_text, "startup_s": startup,
                          "rps": run["rps"], "requests": run["requests"], "failed": run["errors"],
                          "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"], "max_ms": run["max_ms"],
                          "wrk": run}
    return {"mode": "zope-criteria", "timing": timing.__dict__, "environment": env,
            "servers": summaries}


def criteria_table(summaries):
    head = f"{'server':<40} {'workers':<20} {'requests':>9} {'failed':>6} {'req/s':>6} {'p50':>6} {'p99':>7} {'max':>7}"
    lines = [head, "-" * len(head)]
    for s in summaries.values():
        lines.append(f"{s['label'][:40]:<40} {s['shape']:<20} {s['requests']:>9} {s['failed']:>6} "
                     f"{s['rps']:>6.0f} {s['p50_ms']:>6.1f} {s['p99_ms']:>7.1f} {s['max_ms']:>7.1f}")
    lines += ["", "wrk -c100 on /, --timeout 30s; failed: non-2xx answers and socket errors (ms for latencies)."]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short durations, one round")
    parser.add_argument("--zope-criteria", action="store_true",
                        help="100 connections for 100 s against / (gunicorn default, waitress, bjoern)")
    parser.add_argument("--rounds", type=int, help="rounds of every server (default 3, quick 1)")
    parser.add_argument("--target-rounds", type=int,
                        help="rounds of the servers the targets compare (default 5, quick 1)")
    parser.add_argument("--seconds", type=int, help="seconds of one wrk run")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help="measure only these servers (keys: waitress, gunicorn-ini, "
                             "gunicorn-script, sync-w1, gthread-w2, ..., bjoern, and variants)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=ARGS",
                        help="also measure bin/gunicorn-ini-instance with these gunicorn arguments, "
                             "e.g. --variant 'w3t2=-w 3 --threads 2'")
    args = parser.parse_args()

    timing = Timing(**(QUICK if args.quick else FULL).__dict__)
    if args.rounds:
        timing.rounds = args.rounds
    if args.target_rounds:
        timing.target_rounds = args.target_rounds
    timing.target_rounds = max(timing.target_rounds, timing.rounds)
    if args.seconds:
        timing.seconds = args.seconds
    mode = "zope-criteria" if args.zope_criteria else ("quick" if args.quick else "bench")
    if args.zope_criteria and args.quick:
        mode = "zope-criteria-quick"

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    procs = Processes()
    try:
        ensure_tools()
        for port in (PORT, ZEO_PORT):
            if listening(port):
                raise BenchError(f"{HOST}:{port} is in use; the bench needs it (stop that server)")
        build()
        zeo = procs.start(["bin/zeoserver", "fg"], "zeoserver")
        deadline = time.monotonic() + 60
        while not listening(ZEO_PORT):
            if zeo.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the ZEO server did not start:\n{output_tail(zeo)}")
            time.sleep(0.2)
        if args.zope_criteria:
            result = run_criteria(procs, timing)
        else:
            result = run_bench(procs, timing, mode, args.only, [variant(v) for v in args.variant])
    except BenchError as exc:
        sys.exit(f"bench: {exc}")
    finally:
        procs.stop_all()

    result["environment"]["loadavg_end"] = _loadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{mode}.json"
    json_path.write_text(json.dumps(result, indent=1))
    if args.zope_criteria:
        text = criteria_table(result["servers"])
        g, w = result["servers"]["gunicorn-ini"], result["servers"]["waitress"]
        ratio = g["rps"] / w["rps"]
        verdict = [f"failed requests, default gunicorn configuration: {g['failed']} (target 0)"]
    else:
        text = table(result["servers"], result["compute"])
        text += "\n\n" + rounds_table(result)
        text += (f"\n\nslow page: {result['slow_page']['path']}; load average "
                 f"{' '.join(result['environment']['loadavg_start'])} at start, "
                 f"{' '.join(result['environment']['loadavg_end'])} at end")
        if plot(json_path, RESULTS / f"{mode}.png"):
            text += f"\nplot: {(RESULTS / f'{mode}.png').relative_to(REPO)}"
        checks = targets(result["servers"], result["rounds"])
        verdict = [f"{'met    ' if ok else 'NOT MET'}  {line}" for line, ok in checks]
        others = median_of([s["root"]["others_cpu"] for s in result["servers"].values() if "root" in s])
        if others is not None and others > NOISY:
            verdict.append(f"WARNING: other programs took {100 * others:.0f} % of the CPU during the "
                           "runs (median of oth%): these ratios are not reliable; run again on a "
                           "quiet machine")
        ratio = result["servers"].get("gunicorn-ini", {}).get("x_waitress")
    text += "\n\ntargets, default ZEO configuration (recipe defaults, ini mode):\n" + "\n".join(verdict)
    text += f"\n\ngunicorn/waitress throughput ratio: {fmt(ratio, '{:.2f}')}"
    (RESULTS / f"{mode}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
