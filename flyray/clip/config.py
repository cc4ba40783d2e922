"""What a CLIP run is given: how images are embedded and how the embeddings are split."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EmbedConfig:
    batch_size: int = 64  # images per forward pass
    max_actors: int = 0  # embedding actors; 0 = one per GPU, or per CPU without GPUs
    in_process: bool = False  # no actors: embed in the task's process (one small machine)
    cache_uri: str = ""  # embeddings cache (local or s3://); "" = <FLYRAY_DATA_DIR>/clip-embeddings


@dataclass
class SplitConfig:
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    min_per_class: int = 5
