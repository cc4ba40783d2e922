"""`make serve`: every registered model's champion over HTTP with Ray Serve, until Ctrl-C.

python -m flyray.serve [--tracking-uri URI] [--models a,b] [--host 127.0.0.1] [--port 8000]
                       [--poll-seconds 10] [--replicas 1] [--high-throughput]

The tracking store defaults to the one `make run` registers into (MLFLOW_TRACKING_URI, else the
embedded sqlite store under FLYRAY_DATA_DIR, default ./.data). Ray: RAY_ADDRESS when set, else
a local instance.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from flyray import console, registry
from flyray.serve.models import champions

# Ray Serve's high-throughput mode (Ray >= 2.56), opt-in: HAProxy as the HTTP ingress instead
# of the Python proxy actor, and replicas that take requests directly. Read when Ray's processes
# start. Ray 2.60's HAProxy config binds its stats and metrics ports on every interface (no
# setting changes that) and makes its admin socket mode 666, so the socket and config go to a
# folder only this user can enter, and docs/serving.md says to firewall the two ports.
HIGH_THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def high_throughput_env(folder: Path) -> dict[str, str]:
    """HAProxy mode's settings, its files in `folder` (created 0700)."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return {
        **HIGH_THROUGHPUT,
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default="", help="default: as `make run` registers")
    parser.add_argument("--models", default="", help="comma-separated names (default: all)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--poll-seconds", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--high-throughput", action="store_true",
                        help="HAProxy ingress (Ray Serve's high-throughput mode); see "
                        "docs/serving.md#throughput for the ports it opens")  # fmt: skip
    args = parser.parse_args(argv)
    console.configure()
    uri = args.tracking_uri or registry.tracking_uri()
    found = champions(uri)
    names = [n for n in args.models.split(",") if n] or list(found)
    missing = [n for n in names if n not in found]
    if missing or not names:
        print(f"serve: no champion for {missing or 'any model'} in {uri}; models with one: "
              f"{list(found)}. Run a pipeline first (`make run`).", file=sys.stderr)  # fmt: skip
        return 2
    import ray

    from flyray.serve.app import run

    if args.high_throughput and not os.environ.get("RAY_ADDRESS"):  # the local Ray inherits
        os.environ.update(high_throughput_env(registry.data_dir() / "haproxy"))
    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
             log_to_driver=False)  # fmt: skip
    urls = run(names, uri, args.host, args.port, args.poll_seconds, args.replicas)
    print(f"serving from {uri} (following the '{registry.CHAMPION}' alias, every "
          f"{args.poll_seconds:g}s):")  # fmt: skip
    for name, url in urls.items():
        print(f"  {name} v{found[name]}: {url}/")
    print("Ctrl-C stops.")
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
