"""The classifier on CLIP embeddings and its training with Ray Train (TorchTrainer, DDP).

Linear -> BatchNorm -> ReLU -> Dropout -> Linear, as the original system. Each worker trains
on its shard of the training set (Ray Data, equal splits), gradients are averaged by DDP
(gloo on CPU, nccl on GPU), per-epoch train and validation loss are all-reduced, rank 0 logs
them to MLflow and saves a checkpoint every `checkpoint_every` epochs through ray.train.report.
After a worker failure training resumes from the latest checkpoint (`max_failures`), and so does
a run started again on the same `checkpoint_uri` (its Ray Train run name is always RUN_NAME).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from torch import nn

from flyray import storage
from flyray.raytrain import DistributedConfig, TrainingProgress, require_ray, run_config

RUN_NAME = "clip-classifier"  # fixed, so that a run started again on its checkpoint_uri resumes


@dataclass
class ClassifierParams:
    hidden: int = 256
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 20
    batch_size: int = 64
    seed: int = 0


class ClipClassifier(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float


@dataclass
class TrainedClassifier:
    """The trained module with what is needed to rebuild and use it."""

    model: ClipClassifier
    labels: list[str]
    embedding_model: str
    params: ClassifierParams
    history: list[EpochMetrics] = field(default_factory=list)
    workers: int = 1  # in the worker group that finished (fewer than asked after a lost node)
    resumed_from_epoch: int = 0  # the checkpoint the last restart after a failure continued from

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        with torch.inference_mode():
            return torch.softmax(self.model(torch.tensor(np.asarray(x, np.float32))), -1).numpy()

    def save(self, uri: str) -> None:
        """classifier.pt (state dict) and classifier.json (shape, labels, embedding model), each
        written whole or not at all."""
        fs, path = storage.filesystem(uri)
        meta = {
            "in_dim": self.model.net[0].in_features,
            "labels": self.labels,
            "embedding_model": self.embedding_model,
            "params": asdict(self.params),
            "history": [asdict(h) for h in self.history],
            "workers": self.workers,
            "resumed_from_epoch": self.resumed_from_epoch,
        }
        with storage.atomic_output(fs, f"{path}/classifier.pt") as out:
            torch.save(self.model.state_dict(), out)
        storage.write_atomic(fs, f"{path}/classifier.json", json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, uri: str) -> TrainedClassifier:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(f"{path}/classifier.json") as fh:
            meta = json.loads(fh.read())
        params = ClassifierParams(**meta["params"])
        model = ClipClassifier(meta["in_dim"], len(meta["labels"]), params.hidden, params.dropout)
        with fs.open_input_file(f"{path}/classifier.pt") as fh:
            model.load_state_dict(torch.load(fh, map_location="cpu", weights_only=True))
        history = [EpochMetrics(**h) for h in meta["history"]]
        return cls(
            model.eval(), meta["labels"], meta["embedding_model"], params, history, meta["workers"],
            meta.get("resumed_from_epoch", 0),
        )  # fmt: skip


def training_dataset(table: pa.Table, seed: int | None = None) -> ray.data.Dataset:
    """embedding (fixed-width) and label_idx columns as a Ray Dataset; with a seed, rows are
    permuted first, so that no shard or batch holds one class only (rows come sorted by path,
    that is by class folder, and BatchNorm over a one-class batch erases the class signal)."""
    table = table.select(["embedding", "label_idx"])
    if seed is not None:
        table = table.take(np.random.default_rng(seed).permutation(table.num_rows))
    return ray.data.from_arrow(table)


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import mlflow
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    params = ClassifierParams(**config["params"])
    torch.manual_seed(params.seed)
    rank = ray.train.get_context().get_world_rank()
    device = get_device()
    model = ClipClassifier(config["in_dim"], config["n_classes"], params.hidden, params.dropout)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=params.lr, weight_decay=params.weight_decay
    )
    start, history, resumed_from = 0, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restart after a failure: continue from the last epoch saved
        with checkpoint.as_directory() as folder:
            state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
        resumed_from = start
    model = prepare_model(model)
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 and config["run_id"] else None
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")

    def batches(shard, shuffle_seed: int | None = None):
        return shard.iter_torch_batches(
            batch_size=params.batch_size,
            device=device,
            local_shuffle_buffer_size=None if shuffle_seed is None else 4 * params.batch_size,
            local_shuffle_seed=shuffle_seed,
        )

    for epoch in range(start + 1, params.epochs + 1):
        model.train()
        sums = torch.zeros(2, device=device)  # loss, rows
        # a fresh order every epoch on every rank, the same on every run
        for batch in batches(train_shard, shuffle_seed=params.seed + 1000 * epoch + rank):
            x, y = batch["embedding"], batch["label_idx"]
            if len(y) < 2:  # BatchNorm cannot normalise one row; every rank skips alike
                continue
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            (loss / len(y)).backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), torch.tensor(float(len(y)), device=device)])
        model.eval()
        val = torch.zeros(3, device=device)  # loss, correct, rows
        with torch.no_grad():
            for batch in batches(val_shard):
                logits = model(batch["embedding"])
                y = batch["label_idx"]
                val += torch.stack(
                    [
                        loss_fn(logits, y),
                        (logits.argmax(-1) == y).sum().float(),
                        torch.tensor(float(len(y)), device=device),
                    ]
                )
        dist.all_reduce(sums)
        dist.all_reduce(val)
        metrics = EpochMetrics(
            epoch,
            float(sums[0] / sums[1].clamp(min=1)),
            float(val[0] / val[2].clamp(min=1)),
            float(val[1] / val[2].clamp(min=1)),
        )
        history.append(asdict(metrics))
        world = ray.train.get_context().get_world_size()
        if client:
            for key in ("train_loss", "validation_loss", "validation_accuracy"):
                client.log_metric(config["run_id"], key, getattr(metrics, key), step=epoch)
        if epoch % config["checkpoint_every"] and epoch != params.epochs:
            continue  # every rank alike: ray.train.report waits for all of them
        if rank != 0:
            ray.train.report(asdict(metrics))
            continue
        with tempfile.TemporaryDirectory() as folder:
            state = {
                "model": model.module.state_dict()
                if hasattr(model, "module")
                else model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "resumed_from": resumed_from,
                "workers": world,
            }
            torch.save(state, os.path.join(folder, "state.pt"))
            ray.train.report(
                asdict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder)
            )


def use_gpu(resources: dict[str, float]) -> bool:
    return resources.get("GPU", 0) > 0


def train_classifier(
    train: pa.Table,
    validation: pa.Table,
    labels: list[str],
    embedding_model: str,
    params: ClassifierParams | None = None,
    config: DistributedConfig | None = None,
    tracking_uri: str = "",
    run_id: str = "",
) -> TrainedClassifier:
    """Train on (embedding, label_idx) rows with TorchTrainer, `config.workers` workers of
    `cpus_per_worker` CPUs (and a GPU each when the cluster has GPUs); per-epoch losses go to
    the MLflow run `run_id` when given."""
    from ray.train.torch import TorchConfig, TorchTrainer

    params, config = params or ClassifierParams(), config or DistributedConfig()
    require_ray()
    gpu = use_gpu(ray.cluster_resources())
    progress = TrainingProgress(params.epochs, "classifier", "epoch", config.checkpoint_every)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "params": asdict(params),
            "in_dim": train.schema.field("embedding").type.list_size,
            "n_classes": len(labels),
            "tracking_uri": tracking_uri,
            "run_id": run_id,
            "checkpoint_every": config.checkpoint_every,
        },
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.worker_count(),
            use_gpu=gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},  # and 1 GPU with use_gpu
        ),
        run_config=run_config(RUN_NAME, config, callbacks=progress.callbacks)[0],
        datasets={
            "train": training_dataset(train, params.seed),
            "validation": training_dataset(validation),
        },
    )
    with progress:
        result = trainer.fit()
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    model = ClipClassifier(
        train.schema.field("embedding").type.list_size, len(labels), params.hidden, params.dropout
    )
    model.load_state_dict(state["model"])
    history = [EpochMetrics(**h) for h in state["history"]]
    return TrainedClassifier(
        model.eval(), labels, embedding_model, params, history, state["workers"],
        state["resumed_from"],
    )  # fmt: skip
