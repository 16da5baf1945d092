"""Throughput against workers, from a bench.py JSON result: plot.py RESULT.json OUT.png

Run by bench.py with the matplotlib of its own virtualenv (benchmarks/work/plotenv).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(json_path, png_path):
    result = json.load(open(json_path))
    servers = result["servers"]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {("zope", "sync"): ("tab:blue", "-", "o"), ("zope", "gthread"): ("tab:green", "-", "s"),
              ("hello", "sync"): ("tab:blue", ":", "o"), ("hello", "gthread"): ("tab:green", ":", "s")}
    for (app, worker_class), (color, line, marker) in styles.items():
        points = sorted(
            (s["workers"], s["root"]["rps"], s["threads"]) for key, s in servers.items()
            if s["app"] == app and s["worker_class"] == worker_class and s["family"] == "gunicorn"
            and "root" in s and (app == "hello" or key.startswith(worker_class + "-w")))
        if points:
            threads = points[-1][2]
            what = "Zope" if app == "zope" else "hello world (ceiling)"
            ax.plot([p[0] for p in points], [p[1] for p in points], color=color, linestyle=line,
                    marker=marker, label=f"gunicorn {worker_class}, {threads} thr: {what}")
    for key, color, text in (("waitress", "tab:red", "waitress, bin/instance console"),
                             ("bjoern", "tab:purple", "bjoern, 1 process")):
        if "root" in servers.get(key, {}):
            ax.axhline(servers[key]["root"]["rps"], color=color, linestyle="--", label=text)
    limit = result["compute"]["root"]["limit"]
    ax.axhline(limit, color="black", linestyle="-.",
               label=f"compute limit: in-process rate x {result['environment']['cores']} cores")
    default = servers.get("gunicorn-ini", {})
    if "root" in default:
        ax.plot([default["workers"]], [default["root"]["rps"]], marker="*", markersize=16,
                color="gold", markeredgecolor="black", linestyle="none",
                label="default ZEO configuration")
    ax.set_xlabel("gunicorn workers")
    ax.set_ylabel('requests/s on "/" (median of rounds)')
    ax.set_xticks(sorted({s["workers"] for s in servers.values() if s["family"] == "gunicorn"}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    env = result["environment"]
    ax.set_title(f"Zope over ZEO: throughput against workers ({env['cores']} cores, {env['date'][:10]})")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
