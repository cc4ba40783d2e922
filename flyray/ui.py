"""`make ui`: the MLflow UI on the embedded tracking store, bound to 127.0.0.1, and one local
page listing the decks of the latest local run (task, tab, link).

Local Flyte runs write each task's deck to `<tmp>/flyte-*/sandbox/local_flytekit/<hash>/deck.html`
(one `flyte-*` folder per process); tasks mark their deck with the task's name (tasks/platform.py
`publish`), and a process's decks share one tab list, so a file's own tab is its last one.

python -m flyray.ui [--port 5000] [--index-only]
"""

from __future__ import annotations

import argparse
import html
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from flyray import registry
from flyray.storage import write_atomic

TASK_MARK = "flyray-task:"
_TAB = re.compile(r'handleLinkClick\(this\)">([^<]+)</li>')
_TASK = re.compile(re.escape(f"<!-- {TASK_MARK} ") + r"([\w.-]+) -->")
_FLYTEKIT_TABS = {"Timeline", "Source Code", "Dependencies", "Input", "Output"}


@dataclass(frozen=True)
class DeckFile:
    task: str
    tab: str
    path: Path
    modified: float


def sandboxes() -> list[Path]:
    """Local Flyte sandboxes: `make run`, backfill and reproduce keep theirs under
    <data dir>/tmp (workflows/local.py); a plain `pyflyte run` uses the system temp folder."""
    roots = {registry.data_dir() / "tmp", Path(tempfile.gettempdir())}
    return [p for root in roots if root.is_dir() for p in root.glob("flyte-*") if p.is_dir()]


def read_deck(path: Path) -> DeckFile:
    text = path.read_text(errors="replace")
    tabs = [t for t in _TAB.findall(text) if t not in _FLYTEKIT_TABS]
    tasks = _TASK.findall(text)
    tab = tabs[-1] if tabs else "deck"
    return DeckFile(tasks[-1] if tasks else tab, tab, path, path.stat().st_mtime)


def latest_decks(since: float = 0.0) -> list[DeckFile]:
    """The decks of the most recent local run (the newest sandbox holding decks), oldest first;
    with `since`, only files written after it."""
    runs = []
    for box in sandboxes():
        decks = [read_deck(p) for p in box.glob("sandbox/local_flytekit/*/deck.html")]
        decks = [d for d in decks if d.modified >= since]
        if decks:
            runs.append(sorted(decks, key=lambda d: d.modified))
    return max(runs, key=lambda r: r[-1].modified) if runs else []


def write_index(decks: list[DeckFile], path: Path | None = None) -> Path:
    """One HTML page linking every deck; written atomically next to the tracking store."""
    path = path or registry.data_dir() / "decks.html"
    rows = "\n".join(
        f'<tr><td>{html.escape(d.task)}</td><td><a href="{d.path.as_uri()}">'
        f"{html.escape(d.tab)}</a></td><td>{d.path.parent}</td></tr>"
        for d in decks
    )
    page = (
        "<!doctype html><meta charset='utf-8'><title>flyray decks</title>"
        "<h1>Decks of the latest local run</h1>"
        f"<table><tr><th>task</th><th>deck</th><th>folder</th></tr>\n{rows}\n</table>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(pafs.LocalFileSystem(), str(path), page.encode())
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("FLYRAY_UI_PORT", 5000)))
    parser.add_argument("--index-only", action="store_true", help="write the deck page, no UI")
    args = parser.parse_args(argv)
    decks = latest_decks()
    index = write_index(decks)
    print(f"decks of the latest run ({len(decks)}): {index.as_uri()}")
    if args.index_only:
        return
    uri = registry.tracking_uri()
    print(f"MLflow UI on {uri}: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1"]
    os.execv(command[0], [*command, "--port", str(args.port)])


if __name__ == "__main__":
    main()
