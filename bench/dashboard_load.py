"""Dashboard load test: 10 concurrent clients on loopback for 20 s while a capture job runs (#19).

The dashboard is served as `attnlab dashboard` serves it (Flask's threaded server) in a separate
process, over an empty runs directory. A capture of every layer of a long text is started the way
the page starts it (a POST of the capture button's callback, found in `/_dash-dependencies`), and
once the job is running each client loops over the two requests of a page load, the page (`/`) and
its layout (`/_dash-layout`), for `--seconds`. Latencies per request kind: p50, p90, p99 and max.
The target (#19): p99 < 1 s for both on the 2-core machine. Browsers also poll the job list every
0.5 s (`jobs_panel.POLL_MS`); `--poll` adds that request to each client's loop.

    python bench/dashboard_load.py [--clients 10] [--seconds 20] [--tokens 2048] [--poll] [--out bench/results]

Writes dashboard_load.json and dashboard_load.md (the table) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(runs: Path, port: int) -> subprocess.Popen:
    code = ("import sys; from attnlab.app.dashboard import create_app; "
            f"create_app(sys.argv[1]).run(host='127.0.0.1', port={port}, debug=False, "
            "dev_tools_disable_version_check=True)")
    return subprocess.Popen([sys.executable, "-c", code, str(runs)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "DASH_DISABLE_VERSION_CHECK": "true"})


def _callback(deps: list[dict], input_id: str) -> dict:
    """The callback whose only input is `input_id`.n_clicks (the page's button)."""
    return next(d for d in deps if [i["id"] for i in d["inputs"]] == [input_id])


def _outputs(output: str) -> list[dict]:
    """A dependency's output string ('..a.b...c.d@hash..' or 'a.b') -> [{"id", "property"}]."""
    parts = output.strip(".").split("...") if output.startswith("..") else [output]
    return [{"id": p.rsplit(".", 1)[0], "property": p.rsplit(".", 1)[1]} for p in parts]


def _text(n_tokens: int) -> str:
    from importlib import resources

    from attnlab.probe import load

    probe = load(MODEL, device="cpu")
    base = resources.files("attnlab.probe").joinpath("data/haystack.txt").read_text()
    ids = probe.tokenize((base + " ") * 4, prepend_bos=False).input_ids[0, : n_tokens - 1].tolist()
    return probe.tokenizer.decode(ids)


def _start_capture(url: str, text: str) -> None:
    deps = requests.get(f"{url}/_dash-dependencies", timeout=30).json()
    dep = _callback(deps, "run")
    values = {"model": MODEL, "text": text, "bos": ["bos"], "layers": None}
    body = {"output": dep["output"], "outputs": _outputs(dep["output"]),
            "inputs": [{"id": "run", "property": "n_clicks", "value": 1}],
            "state": [{**s, "value": values[s["id"]]} for s in dep["state"]], "changedPropIds": ["run.n_clicks"]}
    answer = requests.post(f"{url}/_dash-update-component", json=body, timeout=60)
    answer.raise_for_status()
    if "already running" in answer.text or '"message"' in answer.text and "job" not in answer.text:
        raise SystemExit(f"the capture did not start: {answer.text[:300]}")


def _poll_body(deps: list[dict]) -> dict:
    dep = next(d for d in deps if [i["id"] for i in d["inputs"]] == ["poll"])
    return {"output": dep["output"], "outputs": _outputs(dep["output"]),
            "inputs": [{"id": "poll", "property": "n_intervals", "value": 1}],
            "state": [{**s, "value": None} for s in dep["state"]], "changedPropIds": ["poll.n_intervals"]}


def _job_text(url: str, poll: dict) -> str:
    """The progress line every page shows ('capture ...: capturing N tokens: layer 3/30, 12 s')."""
    r = requests.post(f"{url}/_dash-update-component", json=poll, timeout=30)
    if r.status_code != 200:
        return ""
    return str(r.json()["response"].get("progress-text", {}).get("children", ""))  # the job's progress line


def _client(url: str, until: float, poll: dict | None, out: dict[str, list[float]], errors: list[str]) -> None:
    session = requests.Session()
    while time.time() < until:
        for kind in ("page", "layout", "poll") if poll else ("page", "layout"):
            started = time.perf_counter()
            try:
                if kind == "poll":
                    r = session.post(f"{url}/_dash-update-component", json=poll, timeout=30)
                else:
                    r = session.get(url + ("/" if kind == "page" else "/_dash-layout"), timeout=30)
                if r.status_code not in (200, 204):
                    errors.append(f"{kind}: HTTP {r.status_code}")
            except requests.RequestException as e:
                errors.append(f"{kind}: {type(e).__name__}")
                continue
            out[kind].append(time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--poll", action="store_true", help="also poll the job list, as a browser does")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    text = _text(args.tokens)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = _serve(Path(tmp) / "runs", port)
        try:
            for _ in range(600):
                try:
                    requests.get(url + "/", timeout=2)
                    break
                except requests.RequestException:
                    time.sleep(0.1)
            deps = requests.get(f"{url}/_dash-dependencies", timeout=30).json()
            poll = _poll_body(deps)
            _start_capture(url, text)
            started = time.time()
            while not re.search(r"layer \d+/\d+", status := _job_text(url, poll)):  # model loaded, layers running
                if time.time() - started > 300:
                    raise SystemExit(f"the capture did not report progress: {status[:300]}")
                time.sleep(0.5)
            out: dict[str, list[float]] = {"page": [], "layout": [], "poll": []}
            errors: list[str] = []
            until = time.time() + args.seconds
            threads = [threading.Thread(target=_client, args=(url, until, poll if args.poll else None, out, errors))
                       for _ in range(args.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            still = _job_text(url, poll)
            running_after = re.search(r"layer \d+/\d+", still) is not None  # still running, not 'done in'
        finally:
            server.terminate()
            server.wait(timeout=30)
    rows = {}
    for kind, xs in out.items():
        if xs:
            a = np.array(xs)
            rows[kind] = {"n": len(xs), "p50_s": float(np.percentile(a, 50)), "p90_s": float(np.percentile(a, 90)),
                          "p99_s": float(np.percentile(a, 99)), "max_s": float(a.max())}
    result = {"clients": args.clients, "seconds": args.seconds, "tokens": args.tokens, "model": MODEL,
              "poll": args.poll, "capture_running_throughout": running_after, "errors": errors[:20],
              "n_errors": len(errors), "cpus": os.cpu_count(), "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "latency": rows,
              "target": "p99 < 1 s for page and layout"}
    table = ["| request | n | p50 (s) | p90 (s) | p99 (s) | max (s) |", "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {k} | {r['n']} | {r['p50_s']:.3f} | {r['p90_s']:.3f} | {r['p99_s']:.3f} | {r['max_s']:.3f} |"
              for k, r in rows.items()]
    head = (f"{args.clients} clients, {args.seconds:g} s, during a capture of {args.tokens} tokens x every layer of "
            f"{MODEL} (running throughout: {running_after}); {os.cpu_count()} CPUs, load average before "
            f"{load_before[0]:.2f}; {len(errors)} errors")
    print(head)
    print("\n".join(table))
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    name = "dashboard_load" + ("_poll" if args.poll else "")
    (outdir / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (outdir / f"{name}.md").write_text(f"# Dashboard load ({result['date']})\n\n{head}\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
