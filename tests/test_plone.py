"""Plone 6.2 through gunicorn: plone.cfg, a classic site over ZEO, two workers,
pages read and a file written and read back as a blob.

Slow (Plone is about 160 more distributions, and a site takes a while to
create), so ``make test`` leaves it out; ``make test-plone`` runs it.
"""

import base64
import http.client
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ADMIN, REPO, free_port, request, wait_for_port, wait_until_serving

pytestmark = pytest.mark.plone

CREATE_SITE = REPO / "scripts" / "create_site.py"


def pinned(name, cfg="versions.cfg"):
    return re.search(rf"^{re.escape(name)} = (\S+)$", (REPO / cfg).read_text(), re.M).group(1)


def cpu_ticks(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def post_json(address, path, payload):
    """A plone.restapi request as admin: (status, body bytes)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={
            "Accept": "application/json", "Content-Type": "application/json",
            "Authorization": ADMIN, "Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_plone_site_over_zeo_served_by_two_workers(new_buildout, servers, figures):
    http, zeo = free_port(), free_port()
    buildout = new_buildout("plone", f"""
        [buildout]
        extends = {REPO}/plone.cfg

        [zeoserver]
        zeo-address = 127.0.0.1:{zeo}

        [instance]
        http-address = 127.0.0.1:{http}
    """)
    began = time.monotonic()
    buildout.run()  # plone.cfg refuses unpinned distributions
    built = time.monotonic() - began
    address = f"127.0.0.1:{http}"

    servers([buildout.path("bin", "zeoserver"), "fg"], buildout.dir, name="zeoserver")
    wait_for_port(f"127.0.0.1:{zeo}")

    # The instance is a ZEO client: it creates the site while the server runs.
    # (Started as a server, so that it is stopped with its children if it hangs.)
    began = time.monotonic()
    create = servers([buildout.path("bin", "instance"), "run", CREATE_SITE],
                     buildout.dir, name="create-site")
    assert create.proc.wait(timeout=900) == 0, create.output()
    creation = time.monotonic() - began
    assert "created Plone site /Plone" in create.output(), create.output()
    assert "created page /Plone/gunicorn" in create.output(), create.output()

    began = time.monotonic()
    gunicorn = servers([buildout.path("bin", "gunicorn-instance")], buildout.dir, name="gunicorn")
    assert wait_until_serving(gunicorn, address, timeout=300) == 200
    # Each worker loads Plone and opens its own ZEO connection, one after the other.
    gunicorn.wait_for_output(lambda out: out.count("Ready to handle requests") >= 2, 300)
    booted = time.monotonic() - began
    workers = gunicorn.workers()
    assert len(workers) == 2, gunicorn.output()
    assert gunicorn.output().count("Connected to storage") == 2, gunicorn.output()

    began = time.monotonic()
    status, body = request(address, "/Plone", timeout=120)
    first_page = time.monotonic() - began
    assert status == 200, body[-2000:]
    assert b"Plone served by gunicorn" in body  # the site's title

    status, body = request(address, "/Plone/gunicorn", timeout=120)
    assert status == 200, body[-2000:]
    assert b"Served by gunicorn" in body  # the page's title

    # The control panel asks for a login; as admin it shows the versions,
    # and the server read from SERVER_SOFTWARE, which gunicorn sets.
    assert request(address, "/Plone/@@overview-controlpanel", timeout=120)[0] in (302, 401)
    status, body = request(address, "/Plone/@@overview-controlpanel", auth=ADMIN, timeout=120)
    assert status == 200, body[-2000:]
    page = re.sub(r"\s+", " ", body.decode())
    assert f"Plone {pinned('Plone', 'versions-plone.cfg')}" in page
    assert "needs to be upgraded" not in page  # plone.app.upgrade knows this profile
    server = re.search(r"Server: <span>([^<]*)</span> <span>([^<]*)</span>", page)
    assert server and server.groups() == ("gunicorn", pinned("gunicorn")), page[-3000:]

    # Both workers render Plone pages.
    before = {pid: cpu_ticks(pid) for pid in workers}
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(
            lambda path: request(address, path, timeout=120)[0],
            ["/Plone", "/Plone/gunicorn"] * 20))
    used = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
    assert statuses == [200] * 40, statuses
    assert all(ticks > 0 for ticks in used.values()), used
    assert set(gunicorn.workers()) == set(workers)  # no worker died on the way

    # A file uploaded through a worker (plone.restapi) is committed over ZEO as
    # a blob; both workers serve it, from the blob cache directory they share
    # (shared-blob = off; ZEO locks each cached blob against the other process).
    data = os.urandom(300_000)
    status, body = post_json(address, "/Plone", {
        "@type": "File", "id": "upload", "title": "Uploaded through gunicorn",
        "file": {"data": base64.b64encode(data).decode(), "encoding": "base64",
                 "filename": "upload.bin", "content-type": "application/octet-stream"}})
    assert status == 201, body[-2000:]
    stored = [path for path in buildout.path("var", "blobstorage").rglob("*.blob")
              if path.stat().st_size == len(data) and path.read_bytes() == data]
    assert len(stored) == 1  # on the ZEO server
    before = {pid: cpu_ticks(pid) for pid in workers}
    with ThreadPoolExecutor(8) as pool:
        downloads = list(pool.map(
            lambda _: request(address, "/Plone/upload/@@download/file", auth=ADMIN, timeout=120),
            range(40)))
    used_by_downloads = {pid: cpu_ticks(pid) - before[pid] for pid in workers}
    assert [status for status, _ in downloads] == [200] * 40
    assert all(body == data for _, body in downloads)
    assert all(ticks > 0 for ticks in used_by_downloads.values()), used_by_downloads
    assert set(gunicorn.workers()) == set(workers)

    assert gunicorn.stop() == 0
    output = gunicorn.log_path.read_text(errors="replace")  # all of it, stop included
    assert "Traceback" not in output, output
    assert "Cannot find or parse version" not in output, output  # SERVER_SOFTWARE
    log = buildout.path("var", "log", "gunicorn.log").read_text()
    bad = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    assert not bad, "\n".join(bad)

    figures(f"plone.cfg built in {built:.0f}s, site created in {creation:.0f}s, "
            f"2 workers ready in {booted:.0f}s, first front page in {first_page:.1f}s; "
            f"40 pages at 8 concurrent, worker CPU ticks {used}; "
            f"40 downloads of a 300 kB blob, worker CPU ticks {used_by_downloads}")
