"""The front door: a quiet console with the full log in a file, the deck page, the shared-data skip."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, shared_data

from tests import background

# Logs as flyray, Ray, Ray Data and MLflow do, inside one task's lines.
SCRIPT = textwrap.dedent(
    """
    import logging, warnings
    from flyray import console
    import mlflow.utils.logging_utils as mlflow_logging
    with console.task_lines("prepare_data"):
        logging.getLogger("flyray.recsys").info("epoch 1/3: train RMSE 0.9")
        logging.getLogger("flyray.clickstream").warning("12 rejected records kept in rejects/")
        logging.getLogger("ray").info("Calling ray.init() again after it has already been called.")
        logging.getLogger("ray.data").info("Starting execution of Dataset dataset_1")
        logging.getLogger("ray.train").error("worker group failed to start")
        mlflow_logging.eprint("Successfully registered model 'flyray-funksvd'.")
        warnings.warn("a library's deprecation notice", FutureWarning)
    print("LOG", console.log_path())
    """
)


def _run(tmp_path: Path, **env) -> tuple[list[str], str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FLYRAY_LOG", "RAY_LOG"))}
    environ.update(FLYRAY_DATA_DIR=str(tmp_path), **env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environ, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log_file = proc.stdout.split("LOG ", 1)[1].strip()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines, Path(log_file).read_text(), log_file


def test_quiet_console_shows_task_lines_and_warnings_and_the_file_keeps_everything(tmp_path):
    lines, log, path = _run(tmp_path)
    assert Path(path).parent == tmp_path / "logs"
    assert lines[0] == "prepare_data ..."
    assert lines[1] == "warning: 12 rejected records kept in rejects/"
    assert lines[2] == "error: worker group failed to start"
    assert re.fullmatch(r"prepare_data done in \d+\.\d s", lines[3])
    assert len(lines) == 4, lines
    for text in ("epoch 1/3", "Calling ray.init() again", "Starting execution of Dataset",
                 "12 rejected records", "deprecation notice", "prepare_data done"):  # fmt: skip
        assert text in log


def test_debug_brings_every_library_back(tmp_path):
    lines, _, _ = _run(tmp_path, FLYRAY_LOG_LEVEL="DEBUG")
    text = "\n".join(lines)
    for shown in ("epoch 1/3", "Calling ray.init() again", "Starting execution of Dataset",
                  "Successfully registered model", "deprecation notice"):  # fmt: skip
        assert shown in text


def test_info_adds_flyray_progress_lines_only(tmp_path):
    lines, _, _ = _run(tmp_path, FLYRAY_LOG_LEVEL="INFO")
    text = "\n".join(lines)
    assert "epoch 1/3: train RMSE 0.9" in text
    assert "Calling ray.init()" not in text and "Starting execution" not in text


def test_bad_log_level_names_the_variable(tmp_path):
    environ = {**os.environ, "FLYRAY_LOG_LEVEL": "LOUD", "FLYRAY_DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=environ, cwd=REPO)  # fmt: skip
    assert proc.returncode != 0
    assert "FLYRAY_LOG_LEVEL='LOUD'" in proc.stderr and "DEBUG, INFO, WARNING" in proc.stderr


@pytest.mark.e2e
@pytest.mark.background("make run")
def test_make_run_prints_a_short_summary_with_the_log_and_the_deck_page():
    """`make run`'s entry point on a small demo: at most 40 lines, every task's start and end,
    the summary; the log file it names holds the epochs; the deck page links existing decks."""
    proc = background.result("make run")  # started with the session, beside the other tests
    assert proc.code == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    assert len(lines) <= 40, "\n".join(lines)
    for name in ("ingest_clickstream", "build_ratings", "train_recommender", "evaluate_model",
                 "register_model", "recommend_users"):  # fmt: skip
        assert f"{name} ..." in lines
        assert any(re.fullmatch(rf"{name} done in \d+\.\d s", line) for line in lines), name
    assert not [line for line in lines if " INFO " in line or "Reporting training result" in line]
    log = Path(re.search(r"full log: (\S+)", proc.stdout).group(1))
    assert log.parent == proc.folder / "data" / "logs"
    assert re.search(r"epoch (\d+)/\1:", log.read_text())  # the final training's last epoch
    page = Path(re.search(r"decks \(.*\): file://(\S+)", proc.stdout).group(1))
    links = re.findall(r'href="file://([^"]+)"', page.read_text())
    tabs = {"ingest", "data profile", "tuning", "training", "evaluation", "registry"}
    assert len(links) == len(tabs) and all(Path(link).exists() for link in links)
    assert tabs == set(re.findall(r'">([^<]+)</a>', page.read_text()))


def test_shared_data_skips_with_the_missing_path():
    with pytest.raises(pytest.skip.Exception, match=r"no-such-sample\.csv is absent"):
        shared_data("clickstream", "no-such-sample.csv")


@pytest.mark.usefixtures("ray_cluster")
def test_training_progress_counts_every_ray_train_report(monkeypatch):
    """The bar lives in the driver while Ray Train reports from its controller actor."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from flyray.raytrain import DistributedConfig, TrainingProgress, run_config

    monkeypatch.setenv("FLYRAY_LOG_LEVEL", "DEBUG")  # a visible bar even without a terminal

    def loop():
        for epoch in range(3):
            ray.train.report({"epoch": epoch})

    progress = TrainingProgress(5, "test", "epoch", every=2)
    config = DistributedConfig(workers=1, min_workers=0)
    trainer = TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=run_config(None, config, callbacks=progress.callbacks)[0],
    )
    with progress:
        trainer.fit()
    assert progress.bar.n == 5  # 2 + 2 + the last 1


def _deck(root: Path, run: str, node: str, task: str, tabs: list[str], mtime: float) -> Path:
    path = root / run / "sandbox" / "local_flytekit" / node / "deck.html"
    path.parent.mkdir(parents=True)
    items = "".join(f'<li onclick="handleLinkClick(this)">{t}</li>' for t in tabs)
    path.write_text(f"<ul>{items}</ul><!-- flyray-task: {task} -->")
    os.utime(path, (mtime, mtime))
    return path


def test_deck_page_lists_the_latest_runs_decks_by_task(tmp_path, monkeypatch):
    from flyray import ui

    monkeypatch.setenv("FLYRAY_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ui.tempfile, "gettempdir", lambda: str(tmp_path / "none"))
    sandboxes = tmp_path / "tmp"
    _deck(sandboxes, "flyte-old", "a", "train_model", ["Timeline", "training"], 1000)
    ingest = _deck(sandboxes, "flyte-new", "b", "ingest_clickstream", ["Input", "ingest"], 2000)
    _deck(sandboxes, "flyte-new", "c", "evaluate_model", ["ingest", "Output", "evaluation"], 2001)
    decks = ui.latest_decks()
    assert [(d.task, d.tab) for d in decks] == [
        ("ingest_clickstream", "ingest"),
        ("evaluate_model", "evaluation"),
    ]
    page = ui.write_index(decks).read_text()
    assert ui.write_index(decks) == tmp_path / "decks.html"
    assert f'href="{ingest.as_uri()}"' in page and "train_model" not in page
    assert ui.latest_decks(since=2000.5)[0].task == "evaluate_model"
