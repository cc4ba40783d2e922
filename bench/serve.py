"""Benchmark: top-10 recommendations served by `python -m flyray.serve` (Ray Serve) vs the two
things a user would pick instead: the MLflow pyfunc called in-process, and `mlflow models serve`
over HTTP.

    python -m bench.serve [--users 20000] [--items 10000] [--factors 32] [--seconds 8]
                          [--clients 1,8]

One FunkSVD is trained on generated ratings (seed 0) and registered as the champion in a fresh
embedded store. Each target is measured in the same run, one after the other, on loopback: for
every client count, that many client threads send top-10 requests for one random known user each
(persistent HTTP connections) for a fixed time after a short warm-up; requests/s and p50/p99
latency. Clients and servers share this machine's cores, so the clients' own cost is in every
row alike. Before timing, the Ray Serve answer is checked against the pyfunc's for a sample of
users. Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MODEL = "bench-serve-funksvd"
N = 10


def ratings(users: int, items: int, per_user: int, seed: int = 0) -> pd.DataFrame:
    """Ratings from latent tastes, items drawn with a long-tailed popularity."""
    rng = np.random.default_rng(seed)
    pu, qi = rng.normal(0, 0.5, (users, 8)), rng.normal(0, 0.5, (items, 8))
    popularity = 1 / np.arange(1, items + 1) ** 0.8
    u = np.repeat(np.arange(users), per_user)
    i = rng.choice(items, len(u), p=popularity / popularity.sum())
    r = np.clip(3.5 + (pu[u] * qi[i]).sum(1) + rng.normal(0, 0.3, len(u)), 1, 5)
    return pd.DataFrame({"user_id": u + 1, "item_id": i + 100_000, "rating": r})


def register(args, data_dir: str) -> tuple[list[int], float]:
    """Train and register the champion; returns its user ids and the training seconds."""
    import mlflow

    from flyray import registry
    from flyray.recsys import FunkSVD
    from flyray.recsys.pyfunc import log_pyfunc

    os.environ["FLYRAY_DATA_DIR"] = data_dir
    registry.use_experiment("bench-serve")
    began = time.perf_counter()
    model = FunkSVD(n_factors=args.factors, n_epochs=5).fit(
        ratings(args.users, args.items, 10)
    )  # fmt: skip
    seconds = time.perf_counter() - began
    model.save(f"{data_dir}/funksvd")
    with mlflow.start_run():
        info = log_pyfunc(model, f"{data_dir}/funksvd", registered_name=MODEL)
    registry.champion_gate(MODEL, str(info.registered_model_version), "ndcg@10", 0.1)
    return model.user_ids.tolist(), seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_sender(port: int, path: str, body) -> callable:
    """A per-thread sender: one persistent connection, one request per call."""

    def make():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def send(user: int) -> None:
            conn.request("POST", path, body(user), {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")

        return send

    return make


def load(make_sender, users: list[int], clients: int, seconds: float, warmup: float) -> dict:
    """`clients` threads send for warm-up + `seconds`; latencies of the timed part only."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start = time.perf_counter() + warmup
    end = start + seconds

    def client(k: int) -> None:
        send = make_sender()
        rng = np.random.default_rng(k)
        mine = latencies[k]
        while (now := time.perf_counter()) < end:
            try:
                send(users[rng.integers(len(users))])
            except Exception as err:  # counted: a failed request is a result too
                errors.append(str(err))
                continue
            if now >= start:
                mine.append(time.perf_counter() - now)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = np.sort(np.concatenate([np.asarray(x) for x in latencies]))
    return {
        "clients": clients,
        "requests": len(done),
        "errors": len(errors),
        "rps": len(done) / seconds,
        "p50_ms": float(np.percentile(done, 50) * 1000) if len(done) else None,
        "p99_ms": float(np.percentile(done, 99) * 1000) if len(done) else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Serving top-10: Ray Serve vs MLflow")
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--replicas", type=int, default=1, help="flyray.serve's replicas")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    users, train_seconds = register(args, tmp)
    print(f"champion: FunkSVD {args.users} users x {args.items} items, {args.factors} factors "
          f"(trained in {train_seconds:.1f}s)", flush=True)  # fmt: skip
    from flyray.registry import tracking_uri

    uri = tracking_uri()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_TMPDIR": "/tmp", "PATH": path}
    rows: dict[str, list[dict]] = {}

    # 1. the pyfunc in-process: what a user calling mlflow.pyfunc.load_model gets
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")

    def in_process():
        def send(user: int) -> None:
            model.predict(pd.DataFrame({"user_id": [user]}), params={"n": N})

        return send

    rows["mlflow pyfunc (in-process)"] = [
        load(in_process, users, c, args.seconds, args.warmup) for c in clients
    ]
    print("pyfunc:", rows["mlflow pyfunc (in-process)"], flush=True)

    # 2. `mlflow models serve` (its defaults: one uvicorn worker)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", proc)

        def mlflow_body(user: int) -> bytes:
            return json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[user]]},
                               "params": {"n": N}}).encode()  # fmt: skip

        make = http_sender(port, "/invocations", mlflow_body)
        rows["mlflow models serve"] = [
            load(make, users, c, args.seconds, args.warmup) for c in clients
        ]
    finally:
        stop(proc)
    print("mlflow models serve:", rows["mlflow models serve"], flush=True)

    # 3. `python -m flyray.serve` (Ray Serve, as `make serve` runs it), in its own Ray
    port = free_port()
    ports = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
             "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "flyray.serve", "--tracking-uri", uri, "--models", MODEL,
         "--port", str(port), "--replicas", str(args.replicas), "--high-throughput"],
        env={**env, **ports}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(f"http://127.0.0.1:{port}/{MODEL}/", proc)
        checked = users[:: max(1, len(users) // 50)]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/{MODEL}/recommend",
            json.dumps({"user_ids": checked, "n": N}).encode(), method="POST",
        )  # fmt: skip
        answer = json.loads(urllib.request.urlopen(request).read())["recommendations"]
        want = model.predict(pd.DataFrame({"user_id": checked}), params={"n": N})
        assert [a["items"] for a in answer] == want.item_id.to_numpy().reshape(-1, N).tolist()

        def serve_body(user: int) -> bytes:
            return json.dumps({"user_ids": [user], "n": N}).encode()

        make = http_sender(port, f"/{MODEL}/recommend", serve_body)
        rows["ray serve (flyray.serve)"] = [
            load(make, users, c, args.seconds, args.warmup) for c in clients
        ]
    finally:
        stop(proc)
    print("ray serve:", rows["ray serve (flyray.serve)"], flush=True)

    anchor = {r["clients"]: r for r in rows["mlflow models serve"]}
    print(f"\n{'target':<28}{'clients':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'errors':>8}{'vs mlflow serve':>17}")  # fmt: skip
    for name, measured in rows.items():
        for r in measured:
            ratio = r["rps"] / anchor[r["clients"]]["rps"] if anchor[r["clients"]]["rps"] else 0
            print(f"{name:<28}{r['clients']:>8}{r['rps']:>9.0f}{r['p50_ms']:>9.2f}"
                  f"{r['p99_ms']:>9.2f}{r['errors']:>8}{ratio:>16.2f}x")  # fmt: skip
    meta = {
        "users": args.users, "items": args.items, "factors": args.factors, "n": N,
        "seconds": args.seconds, "warmup": args.warmup, "cpus": os.cpu_count(),
        "python": platform.python_version(), "load_average": os.getloadavg(),
        "notes": "clients are threads in this process; one random known user per request; "
        "mlflow models serve with its defaults (1 worker); flyray.serve with its defaults "
        "(HAProxy ingress, throughput-optimized Serve, batching)", "replicas": args.replicas,
    }  # fmt: skip
    (RESULTS / "serve.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {RESULTS / 'serve.json'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
