"""The registered champion scored on the challenger's own test split, through its models:/ URI,
against a real `mlflow server`: the same number as the champion's in-memory model on data aligned
by hand, and a clear error when the two cannot be compared."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import xgboost as xgb
from clip_helpers import CLASSES
from mlflow.models import infer_signature
from test_funksvd import synthetic

from flyray import registry
from flyray.clip import evaluate as clip_eval
from flyray.clip.classifier import ClassifierParams, ClipClassifier, TrainedClassifier
from flyray.clip.pyfunc import log_pyfunc as log_clip
from flyray.recsys import FactorModel, FunkSVD
from flyray.recsys.evaluate import champion_metrics as recsys_champion
from flyray.recsys.evaluate import evaluate
from flyray.recsys.funksvd import rmse
from flyray.recsys.model import Ratings
from flyray.recsys.pyfunc import log_pyfunc
from flyray.tabular import evaluate as tab_eval
from flyray.tabular.data import TableSpec, encode_features
from flyray.tabular.train import predict


@pytest.fixture
def tracking(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    registry.use_experiment("champion-scoring")
    return mlflow_server


# ---------------------------------------------------------------------------------- recommender


def _split(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """80/20 split; test rows keep only users and items seen in training."""
    train, test = frame.iloc[: len(frame) * 4 // 5], frame.iloc[len(frame) * 4 // 5 :]
    keep = test.user_id.isin(train.user_id) & test.item_id.isin(train.item_id)
    return train, test[keep]


def _ratings(model: FactorModel, frame: pd.DataFrame) -> Ratings:
    """Raw ids as the model's dense rows (its id maps in any order)."""
    users = pd.Index(model.user_ids).get_indexer(frame.user_id)
    items = pd.Index(model.item_ids).get_indexer(frame.item_id)
    return Ratings(users, items, frame.rating.to_numpy())


@pytest.fixture(scope="module")
def recsys_data():
    champion_train, champion_test = _split(synthetic(n_users=60, n_items=40, n=3_000, seed=0))
    champion = FunkSVD(n_factors=4, n_epochs=3).fit(champion_train)
    # Another data window: 20 users and 10 items the champion never saw, as many it has gone without.
    later = synthetic(n_users=60, n_items=40, n=3_000, seed=1)
    later = later.assign(user_id=later.user_id + 200, item_id=later.item_id + 30)
    return champion, (champion_train, champion_test), _split(later)


@pytest.fixture
def champion_uri(tracking, recsys_data, tmp_path):
    champion = recsys_data[0]
    champion.save(str(tmp_path / "funksvd"))
    with mlflow.start_run():
        info = log_pyfunc(champion, str(tmp_path / "funksvd"), registered_name="champion-funksvd")
    return f"models:/champion-funksvd/{info.registered_model_version}"


def test_recommender_champion_with_the_same_id_maps_scores_as_itself(champion_uri, recsys_data):
    champion, (train, test), _ = recsys_data
    challenger = FunkSVD(n_factors=4, n_epochs=3, seed=1).fit(train)  # same data: same id maps
    train_r, test_r = _ratings(challenger, train), _ratings(challenger, test)
    got = recsys_champion(champion_uri, challenger, train_r, test_r, k=5, max_users=20)
    assert got == evaluate(champion, test_r, 5, "champion", max_users=20)
    assert got.users == 20 < got.test_users


def test_recommender_champion_on_a_shuffled_id_map_ranks_the_same(champion_uri, recsys_data):
    champion, (train, test), _ = recsys_data
    rng = np.random.default_rng(0)
    shuffled = FactorModel.empty(
        rng.permutation(champion.user_ids), rng.permutation(champion.item_ids), 1
    )
    got = recsys_champion(
        champion_uri, shuffled, _ratings(shuffled, train), _ratings(shuffled, test), 5, 0
    )
    want = evaluate(champion, _ratings(champion, test), 5, "champion", max_users=0)
    # The same users, ranked in another order: the sums may differ in the last bits.
    assert dataclasses.astuple(got)[1:] == pytest.approx(dataclasses.astuple(want)[1:], rel=1e-12)


def test_recommender_champion_on_another_window_scores_shared_pairs_identically(
    champion_uri, recsys_data
):
    champion, _, (train, test) = recsys_data
    challenger = FunkSVD(n_factors=4, n_epochs=3).fit(train)
    assert not np.array_equal(challenger.user_ids, champion.user_ids)
    train_r, test_r = _ratings(challenger, train), _ratings(challenger, test)
    got = recsys_champion(champion_uri, challenger, train_r, test_r, k=5, max_users=20)
    own = evaluate(challenger, test_r, 5, max_users=20)
    assert (got.users, got.test_users, got.k) == (own.users, own.test_users, own.k)
    assert got.rmse == rmse(champion.score(test.user_id, test.item_id), test_r.values)

    # Every (user, item) of the challenger's rows, in any order of its id maps: the champion's
    # own score, its biases (or the global mean) for ids it never saw.
    rng = np.random.default_rng(0)
    users, items = rng.permutation(challenger.user_ids), rng.permutation(challenger.item_ids)
    aligned = champion.aligned(users, items)
    u, i = np.meshgrid(np.arange(len(users)), np.arange(len(items)), indexing="ij")
    np.testing.assert_array_equal(
        aligned.score_indexed(u.ravel(), i.ravel()),
        champion.score(users[u.ravel()], items[i.ravel()]),
    )
    unseen = ~np.isin(users, champion.user_ids)
    assert unseen.any() and not aligned.P[unseen].any() and not aligned.bu[unseen].any()


# ---------------------------------------------------------------------------------- tabular


def _spec(features: list[str], colors: list[str], classes=("0", "1")) -> TableSpec:
    return TableSpec(
        source="test", files=1, label="label", label_classes=list(classes), features=features,
        categories={"color": colors}, rows=0, rejected_rows=0, rows_by_split={},
        positive_rate=0.5,
    )  # fmt: skip


def _rows(n: int, seed: int, colors: list[str]) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    num, size, color = rng.normal(size=n), rng.normal(size=n), rng.choice(colors, n)
    y = (num + (color == "red") + rng.normal(0, 0.5, n) > 0.5).astype(np.int8)
    return pa.table({"num": num, "color": color, "size": size}), y


def _encode(table: pa.Table, spec: TableSpec) -> np.ndarray:
    encoded = encode_features(table, spec)
    return np.column_stack([encoded[f].to_numpy() for f in spec.features])


def test_tabular_champion_scores_the_challengers_rows_in_its_own_encoding(tracking, tmp_path):
    champion_spec = _spec(["num", "color", "size"], ["blue", "green", "red"])
    table, y = _rows(300, 0, ["blue", "green", "red"])
    x = _encode(table, champion_spec)
    dtrain = xgb.DMatrix(x, label=y, feature_names=champion_spec.features,
                         feature_types=champion_spec.feature_types(), enable_categorical=True)  # fmt: skip
    booster = xgb.train({"objective": "binary:logistic", "max_depth": 3}, dtrain, 10)
    (tmp_path / "spec.json").write_text(champion_spec.to_json())
    example = pd.DataFrame(x[:5], columns=champion_spec.features)
    with mlflow.start_run():
        info = mlflow.xgboost.log_model(
            booster, name="model", model_format="json", registered_model_name="champion-xgb",
            signature=infer_signature(example, predict(booster, champion_spec, x[:5])),
            input_example=example, extra_files=[str(tmp_path / "spec.json")],
        )  # fmt: skip
    uri = f"models:/champion-xgb/{info.registered_model_version}"

    # The challenger's data: another column order, a category the champion never saw, and the
    # shared ones under other codes.
    spec = _spec(["color", "size", "num"], ["green", "purple", "red"])
    test, y_test = _rows(200, 1, ["green", "purple", "red"])
    x_test = _encode(test, spec)
    by_hand = _encode(test, champion_spec)
    assert np.isnan(by_hand[:, 1]).any()  # purple: missing for the champion
    np.testing.assert_array_equal(tab_eval.recode(x_test, spec, champion_spec), by_hand)
    got = tab_eval.champion_metrics(uri, x_test, y_test, spec)
    assert got == tab_eval.evaluate(predict(booster, champion_spec, by_hand), y_test, "champion")

    other = _spec(["color", "weight", "num"], ["green", "red"])
    with pytest.raises(ValueError, match=r"\['weight'\] only in the data.*\['size'\] only in"):
        tab_eval.champion_metrics(uri, x_test, y_test, other)
    with pytest.raises(ValueError, match="label classes differ"):
        tab_eval.champion_metrics(uri, x_test, y_test, _spec(spec.features, ["red"], ("a", "b")))


# ---------------------------------------------------------------------------------- CNN


@pytest.mark.e2e
@pytest.mark.usefixtures("ray_cluster")
def test_cnn_champion_accuracy_is_its_accuracy_on_the_challengers_images(tracking):
    from flyray.vision.data import ImageSet
    from flyray.vision.evaluate import champion_accuracy
    from flyray.vision.model import CNNParams, build_cnn
    from flyray.vision.train import evaluate as cnn_evaluate

    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = (images[..., 0].mean((1, 2)) // 86).astype(np.int64)  # learnable: brightness
    cnn = build_cnn((8, 8, 3), 3, CNNParams(filters=[4], dense_units=8))
    cnn.fit(images, labels, epochs=2, verbose=0)
    with mlflow.start_run():
        info = mlflow.tensorflow.log_model(
            cnn, name="model", input_example=np.zeros((2, 8, 8, 3), np.float32),
            registered_model_name="champion-cnn",
        )  # fmt: skip
    uri = f"models:/champion-cnn/{info.registered_model_version}"

    test = ImageSet(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8),
                    rng.integers(0, 3, 40), names)  # fmt: skip
    assert champion_accuracy(uri, test) == cnn_evaluate(cnn, test)[0]
    bigger = ImageSet(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64), names)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 3\), the test split has \(16, 16, 3\)"):
        champion_accuracy(uri, bigger)
    with pytest.raises(ValueError, match="predicts 3 classes, the test split has 4"):
        champion_accuracy(uri, ImageSet(test.images, test.labels, [*names, "d"]))


# ---------------------------------------------------------------------------------- CLIP


def _embeddings(labels: list[str], label_map: list[str], seed: int) -> pa.Table:
    """A test split as embed_images writes it: embedding, label, label_idx (in `label_map`)."""
    vectors = np.random.default_rng(seed).normal(size=(len(labels), 32)).astype(np.float32)
    return pa.table({
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 32),
        "label": labels,
        "label_idx": np.array([label_map.index(x) for x in labels], np.int64),
    })  # fmt: skip


@pytest.mark.usefixtures("ray_cluster")  # the CLIP evaluation runs on Ray Data
def test_clip_champion_scores_the_challengers_rows_under_its_label_map(tracking, tmp_path):
    torch.manual_seed(0)
    label_map = sorted(CLASSES)
    champion = TrainedClassifier(ClipClassifier(32, 3, hidden=16).eval(), label_map,
                                 "openai/clip-vit-base-patch32", ClassifierParams(hidden=16))  # fmt: skip
    champion.save(str(tmp_path / "classifier"))
    rows = _embeddings(list(CLASSES) * 8, label_map, seed=0)
    with mlflow.start_run():
        info = log_clip(str(tmp_path / "classifier"), champion, clip_eval.matrix(rows),
                        registered_name="champion-clip")  # fmt: skip
    uri = f"models:/champion-clip/{info.registered_model_version}"

    labels = list(CLASSES) * 8
    challenger_map = label_map[::-1]  # the same classes, other indices
    got = clip_eval.champion_metrics(uri, _embeddings(labels, challenger_map, seed=1))
    by_hand = _embeddings(labels, label_map, seed=1)
    want = clip_eval.evaluate(champion, by_hand, by_hand["label_idx"].to_numpy()).model
    assert got == want

    other = _embeddings(["purple_star", *labels[1:]], ["purple_star", *label_map], seed=1)
    with pytest.raises(
        ValueError, match=r"has \['blue_triangle'.*split \['blue_triangle'.*'purple_star'"
    ):
        clip_eval.champion_metrics(uri, other)
