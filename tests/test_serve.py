"""Serving the champions: Ray Serve on 127.0.0.1 (the session's Ray) in front of a real
`mlflow server`, models trained and registered as the workloads register them. The answers are
the registered models' own; a promotion switches versions under load without a failed request;
bad input gets a 4xx naming the field."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import xgboost as xgb
from clip_helpers import CLASSES, tiny_clip  # noqa: F401
from conftest import _free_port
from PIL import Image
from test_champion_scoring import _encode, _rows, _spec
from test_funksvd import synthetic

from flyray import registry
from flyray.recsys import FactorModel, FunkSVD
from flyray.recsys.pyfunc import log_pyfunc
from flyray.serve import models
from flyray.serve.models import BadRequest
from flyray.tabular.data import TableSpec
from flyray.tabular.train import predict as xgb_predict

COLORS = ["blue", "green", "red"]

# ------------------------------------------------------------------------------ registration


@pytest.fixture(scope="module")
def tracking(mlflow_server):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        yield mlflow_server


@pytest.fixture
def experiment(tracking):
    """MLflow pointed at the test server (each test starts from its own tracking URI)."""
    registry.use_experiment("serve-tests")


def promote(name: str, version: str, value: float) -> None:
    decision = registry.champion_gate(name, version, "ndcg@10", value)
    assert decision.promoted, decision.reason


def register_funksvd(name: str, seed: int, value: float, tmp) -> tuple[FactorModel, str]:
    """A small FunkSVD, logged and gated as the recommender's registration does."""
    model = FunkSVD(n_factors=4, n_epochs=3, seed=seed).fit(synthetic(n=3_000, seed=seed))
    model.save(str(tmp / f"funksvd-{seed}"))
    with mlflow.start_run():
        info = log_pyfunc(model, str(tmp / f"funksvd-{seed}"), registered_name=name)
    version = str(info.registered_model_version)
    promote(name, version, value)
    return model, version


def _table_spec(colors: list[str]) -> TableSpec:
    return _spec(["num", "color", "size"], colors, ("no", "yes"))


def train_booster(spec: TableSpec):
    table, y = _rows(300, 0, COLORS)
    x = _encode(table, spec)
    dtrain = xgb.DMatrix(x, label=y, feature_names=spec.features,
                         feature_types=spec.feature_types(), enable_categorical=True)  # fmt: skip
    return xgb.train({"objective": "binary:logistic", "max_depth": 3}, dtrain, 10), x


def png(color: tuple[int, int, int], size: int = 12) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------------ pure input checks


def test_bad_recommend_input_names_the_field():
    cases = [
        ([1, 2], "body", 400),
        ({}, "user_ids", 422),
        ({"user_ids": []}, "user_ids", 422),
        ({"user_ids": [7, "x"]}, "user_ids[1]", 422),
        ({"user_ids": [7, 1.5]}, "user_ids[1]", 422),
        ({"user_ids": [True]}, "user_ids[0]", 422),
        ({"user_ids": [2**64]}, "user_ids[0]", 422),
        ({"user_ids": list(range(models.MAX_USERS + 1))}, "user_ids", 422),
        ({"user_ids": [7], "n": 0}, "n", 422),
        ({"user_ids": [7], "n": "10"}, "n", 422),
        ({"user_ids": list(range(200)), "n": 501}, "n", 422),  # 100,200 results: over the cap
    ]
    for body, field, status in cases:
        with pytest.raises(BadRequest) as caught:
            models.Recommender.parse_recommend(body)
        assert (caught.value.field, caught.value.status) == (field, status), body
        assert caught.value.body()["error"].startswith(f"{field}: ")
    users, n = models.Recommender.parse_recommend({"user_ids": [7, -3]})
    assert users.tolist() == [7, -3] and n == 10


def test_images_from_bytes_or_base64_and_what_is_not_an_image():
    images, raw = models.decode_images([png((255, 0, 0)), base64.b64encode(png((0, 0, 255)))
                                        .decode()])  # fmt: skip
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]
    assert raw[1] == png((0, 0, 255))
    for values, field, says in [
        ([png((1, 2, 3)), b"not an image"], "images[1]", "cannot read the image"),
        (["%%%"], "images[0]", "not base64"),
        ([123], "images[0]", "expected a base64 string"),
        ([], "images", "at least one image"),
    ]:
        with pytest.raises(BadRequest, match=says) as caught:
            models.decode_images(values)
        assert caught.value.field == field


def test_image_sizes_are_checked_from_headers_before_anything_is_decoded():
    """A 40 KB PNG that claims 13,000 x 13,000 pixels (507 MB as RGB) is refused from its
    header; so are images that pass one by one but not together."""
    import tracemalloc

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("1", (13_000, 13_000)).save(bomb, "PNG")  # 1 bit a pixel compresses to ~40 KB
    assert len(bomb.getvalue()) < 100_000
    tracemalloc.start()
    with pytest.raises(BadRequest, match=r"13000x13000 pixels, over the limit") as caught:
        models.decode_images([png((1, 2, 3)), bomb.getvalue()])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (caught.value.field, caught.value.status) == ("images[1]", 413)
    assert peak < 20 << 20  # nothing was decoded
    side = int((models.MAX_IMAGE_PIXELS) ** 0.5)
    big = io.BytesIO()
    Image.new("1", (side, side)).save(big, "PNG")
    count = models.MAX_REQUEST_PIXELS // (side * side) + 1
    with pytest.raises(BadRequest, match="pixels in all, over the limit") as caught:
        models.decode_images([big.getvalue()] * count)
    assert caught.value.status == 413


def test_tabular_rows_are_encoded_server_side_as_training_encoded_them():
    spec = _table_spec(COLORS)
    booster, _ = train_booster(spec)
    served = models.Tabular(booster, spec)
    table, _ = _rows(20, 1, COLORS)
    rows = table.to_pylist()
    rows[3]["color"] = "purple"  # never seen in training: missing, as training encodes it
    answer = served.predict({"rows": rows})
    want = xgb_predict(booster, spec, _encode(pa.Table.from_pylist(rows), spec))
    got = [p["probability"] for p in answer["predictions"]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert answer["classes"] == ["no", "yes"] and answer["label"] == "label"
    assert [p["class"] for p in answer["predictions"]] == [
        "yes" if p >= 0.5 else "no" for p in want
    ]
    assert answer["predictions"][3]["unknown_categories"] == {"color": "purple"}
    assert all("unknown_categories" not in p for k, p in enumerate(answer["predictions"]) if k != 3)

    def error(rows) -> BadRequest:
        with pytest.raises(BadRequest) as caught:
            served.predict({"rows": rows})
        return caught.value

    good = {"num": 0.1, "color": "red", "size": 1.0}
    assert error([good, {**good, "num": "high"}]).field == "rows[1].num"
    assert error([{"num": 0.1, "color": "red"}]).field == "rows[0].size"
    assert error([{**good, "colour": "red"}]).field == "rows[0].colour"
    assert error([good, [1, 2, 3]]).field == "rows[1]"
    assert error([]).field == "rows"
    assert served.predict({"rows": [{**good, "num": None}]})["predictions"][0]["probability"] > 0


# ------------------------------------------------------------------------------ Ray Serve


def call(url: str, body: object = None, raw: bytes | None = None, headers=None):
    """(status, JSON answer) of a POST (GET when there is no body)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=headers or {},
                                     method="GET" if data is None else "POST")  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def server(tracking, ray_cluster):
    """Serve's HTTP proxy on 127.0.0.1 (a free port) of the session's Ray; `start(name)`
    deploys the application for a registered model, polling the registry every 0.5 s."""
    from ray import serve

    from flyray.serve.app import run

    port = _free_port()

    def start(*names: str) -> str:
        run(list(names), tracking, "127.0.0.1", port, poll_seconds=0.5)
        return f"http://127.0.0.1:{port}"

    yield start
    serve.shutdown()


@pytest.fixture(scope="module")
def recommender(server, tmp_path_factory):
    """flyray-funksvd-like champion v1 (and a registered model without a champion)."""
    tmp = tmp_path_factory.mktemp("serve-models")
    registry.use_experiment("serve-tests")
    model, version = register_funksvd("serve-funksvd", 0, 0.1, tmp)
    with mlflow.start_run():
        log_pyfunc(model, str(tmp / "funksvd-0"), registered_name="serve-no-champion")
    return server("serve-funksvd") + "/serve-funksvd", model, version, tmp


@pytest.mark.e2e
def test_champions_found_and_served_one_route_per_name(recommender, tracking):
    url, _, version, _ = recommender
    found = models.champions(tracking)
    assert found["serve-funksvd"] == version and "serve-no-champion" not in found
    status, answer = call(url + "/")
    assert status == 200 and answer["model_version"] == version
    assert answer["routes"] == ["/serve-funksvd/recommend", "/serve-funksvd/score"]


@pytest.mark.e2e
def test_recommend_and_score_answer_as_the_registered_model(recommender):
    url, model, version, _ = recommender
    known = model.user_ids[:3].tolist()
    status, answer = call(url + "/recommend", {"user_ids": [*known, 123_456_789], "n": 5})
    assert status == 200 and answer["model_version"] == version
    rows = answer["recommendations"]
    assert [r["user_id"] for r in rows] == [*known, 123_456_789]
    want = model.recommend([*known, 123_456_789], n=5)
    assert [r["items"] for r in rows] == want.item_id.to_numpy().reshape(4, 5).tolist()
    np.testing.assert_allclose([r["scores"] for r in rows],
                               want.score.to_numpy().reshape(4, 5), rtol=1e-6)  # fmt: skip
    assert [r["cold_start"] for r in rows] == [False, False, False, True]
    assert call(url + "/recommend", {"user_ids": known[:1]})[1]["recommendations"][0]["items"] \
        == model.recommend(known[:1], n=10).item_id.tolist()  # n defaults to 10  # fmt: skip

    items = model.item_ids[[0, 5, 9]].tolist()
    status, answer = call(url + "/score", {"user_ids": known, "item_ids": items})
    assert status == 200 and answer["model_version"] == version
    assert [(s["user_id"], s["item_id"]) for s in answer["scores"]] == list(
        zip(known, items, strict=True)
    )
    np.testing.assert_allclose([s["score"] for s in answer["scores"]],
                               model.score(known, items), rtol=1e-6)  # fmt: skip


@pytest.mark.e2e
def test_bad_requests_get_a_4xx_naming_the_field(recommender):
    url = recommender[0]
    cases = [
        ("/recommend", None, b"{not json", 400, "body"),
        ("/recommend", {"users": [1]}, None, 422, "user_ids"),
        ("/recommend", {"user_ids": [1, "two"]}, None, 422, "user_ids[1]"),
        ("/recommend", {"user_ids": [1], "n": -1}, None, 422, "n"),
        ("/score", {"user_ids": [1, 2], "item_ids": [3]}, None, 422, "item_ids"),
        ("/score", {"user_ids": [1]}, None, 422, "item_ids"),
        ("/classify", {"images": []}, None, 404, "path"),
    ]
    for route, body, raw, status, field in cases:
        got, answer = call(url + route, body, raw)
        assert (got, answer["field"]) == (status, field), (route, body, answer)
        assert answer["error"].startswith(field) and "Traceback" not in answer["error"]
    got, answer = call(url + "/recommend")  # GET
    assert (got, answer["field"]) == (405, "method")


def _raw_post(url: str, headers: dict[str, str], parts) -> int:
    """Send a POST's headers, then `parts` of its body, and return the status the server
    answers with, stopping the upload as soon as an answer has come."""
    import select
    import socket

    address = urllib.parse.urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=60) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"POST {address.path} HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        for part in parts:
            if select.select([sock], [], [], 0)[0]:  # answered already: send no more
                break
            sock.sendall(part)
        answer = sock.recv(4096)
    return int(answer.split(b" ", 2)[1])


@pytest.mark.e2e
def test_hostile_bodies_are_refused_before_they_are_read_whole_or_parsed(recommender):
    """Past the body limit: 413 from the Content-Length before the body is sent, or counted
    while a body without one (chunked) streams in; JSON nested 100,000 deep: 400, not a
    RecursionError's 500."""
    url = recommender[0] + "/recommend"
    megabyte = b"1," * (1 << 19)
    size = models.MAX_BODY_BYTES * 3  # 48 MB announced; the answer comes after the first MB
    headers = {"Content-Type": "application/json", "Content-Length": str(size)}
    assert _raw_post(url, headers, [megabyte]) == 413
    over = models.MAX_BODY_BYTES + 1
    chunks = [f"{1 << 20:x}\r\n".encode() + b" " * (1 << 20) + b"\r\n"] * (over >> 20)
    chunks += [f"{over % (1 << 20):x}\r\n".encode() + b" " * (over % (1 << 20)) + b"\r\n",
               b"0\r\n\r\n"]  # fmt: skip
    headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    assert _raw_post(url, headers, chunks) == 413
    deep = b'{"user_ids": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    got, answer = call(url, raw=deep)
    assert (got, answer["field"]) == (400, "body") and "nested 100,001 deep" in answer["error"]
    got, answer = call(url, {"user_ids": [1], "n": 10})
    assert got == 200  # and the server is none the worse


@pytest.mark.e2e
def test_a_promotion_switches_versions_under_load_without_a_failed_request(recommender, experiment):
    """Clients keep asking while a better version is registered and promoted: every request
    answers 200, the version changes once from old to new, and the new answers are the new
    model's."""
    url, old_model, old_version, tmp = recommender
    users = old_model.user_ids[:4].tolist()
    answers: list[tuple[int, str | None, list]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            status, answer = call(url + "/recommend", {"user_ids": users, "n": 5})
            items = [r["items"] for r in answer.get("recommendations", [])]
            answers.append((status, answer.get("model_version"), items))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        new_model, new_version = register_funksvd("serve-funksvd", 1, 0.2, tmp)
        deadline = time.time() + 120
        while time.time() < deadline and not any(v == new_version for _, v, _ in answers):
            time.sleep(0.2)
        time.sleep(1.0)  # more requests on the new version
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    statuses = {s for s, _, _ in answers}
    versions = [v for _, v, _ in answers]
    assert statuses == {200}, f"{len(answers)} requests, statuses {statuses}"
    assert versions[0] == old_version and versions[-1] == new_version != old_version
    switched = versions.index(new_version)
    assert set(versions[:switched]) == {old_version}
    assert set(versions[switched:]) <= {old_version, new_version}  # threads finish in any order
    old_items = old_model.recommend(users, n=5).item_id.to_numpy().reshape(4, 5).tolist()
    new_items = new_model.recommend(users, n=5).item_id.to_numpy().reshape(4, 5).tolist()
    assert old_items != new_items
    for _, version, items in answers:
        assert items == (new_items if version == new_version else old_items)
    assert len(answers) > 20


@pytest.mark.e2e
def test_a_name_without_a_champion_answers_503_until_one_is_promoted(recommender, experiment):
    """As a RayService lists every workload's name before its first pipeline has run."""
    url = recommender[0].replace("/serve-funksvd", "")
    from flyray.serve.app import run

    port = int(url.rsplit(":", 1)[1])
    run(["serve-no-champion"], registry.tracking_uri(), "127.0.0.1", port, poll_seconds=0.5)
    status, answer = call(url + "/serve-no-champion/recommend", {"user_ids": [7]})
    assert (status, answer["field"]) == (503, "model") and "no champion yet" in answer["error"]
    promote("serve-no-champion", "1", 0.1)
    deadline = time.time() + 60
    while time.time() < deadline and status != 200:
        time.sleep(0.5)
        status, answer = call(url + "/serve-no-champion/recommend", {"user_ids": [7]})
    assert status == 200 and answer["model_version"] == "1"


@pytest.mark.e2e
def test_xgboost_probabilities_from_raw_rows(server, experiment, tmp_path):
    from flyray.tabular.report import log_model

    spec = _table_spec(COLORS)
    booster, x = train_booster(spec)
    with mlflow.start_run():
        info = log_model(booster, spec, x, "serve-xgboost")
    promote("serve-xgboost", str(info.registered_model_version), 0.9)
    url = server("serve-xgboost") + "/serve-xgboost"
    table, _ = _rows(5, 2, COLORS)
    rows = table.to_pylist()
    status, answer = call(url + "/predict", {"rows": rows})
    assert status == 200 and answer["model_version"] == str(info.registered_model_version)
    want = xgb_predict(booster, spec, _encode(table, spec))
    np.testing.assert_allclose([p["probability"] for p in answer["predictions"]], want,
                               rtol=1e-6)  # fmt: skip
    status, answer = call(url + "/predict", {"rows": [{**rows[0], "num": "many"}]})
    assert (status, answer["field"]) == (422, "rows[0].num")


@pytest.mark.e2e
def test_cnn_classifies_an_uploaded_image(server, experiment, tmp_path):
    from flyray.vision.model import CNNParams, build_cnn
    from flyray.vision.report import log_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    labels = (images[..., 0].mean((1, 2)) // 86).astype(np.int64)  # learnable: brightness
    cnn = build_cnn((8, 8, 3), 3, CNNParams(filters=[4], dense_units=8))
    cnn.fit(images, labels, epochs=2, verbose=0)
    cnn.save(tmp_path / "cnn.keras")
    with mlflow.start_run():
        info = log_model(str(tmp_path / "cnn.keras"), [8, 8, 3], ["dark", "mid", "bright"],
                         "serve-cnn")  # fmt: skip
    promote("serve-cnn", str(info.registered_model_version), 0.9)
    url = server("serve-cnn") + "/serve-cnn/classify"
    pictures = [png((250, 250, 250), 8), png((10, 10, 10), 8)]
    want = np.asarray(cnn(np.stack([np.asarray(Image.open(io.BytesIO(p))) for p in pictures])))
    boundary = "flyray-test-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{k}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + p + b"\r\n"
        for k, p in enumerate(pictures)
    ) + f"--{boundary}--\r\n".encode()  # fmt: skip
    form = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    status, answer = call(url, raw=parts, headers=form)
    assert status == 200 and answer["model_version"] == str(info.registered_model_version)
    names = ["dark", "mid", "bright"]
    assert [p["label"] for p in answer["predictions"]] == [names[k] for k in want.argmax(1)]
    np.testing.assert_allclose([p["score"] for p in answer["predictions"]], want.max(1),
                               rtol=1e-4)  # fmt: skip
    by_json = call(url, {"images": [base64.b64encode(p).decode() for p in pictures]})[1]
    assert by_json["predictions"] == answer["predictions"]
    status, answer = call(url, {"images": [base64.b64encode(b"GIF89a broken").decode()]})
    assert (status, answer["field"]) == (422, "images[0]")
    empty = f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nx\r\n" \
            f"--{boundary}--\r\n"  # fmt: skip
    status, answer = call(url, raw=empty.encode(), headers=form)
    assert (status, answer["field"]) == (422, "image")


@pytest.mark.e2e
def test_clip_classifies_an_image(server, experiment, tmp_path, tiny_clip):  # noqa: F811
    import torch

    from flyray.clip.classifier import ClassifierParams, ClipClassifier, TrainedClassifier
    from flyray.clip.generate import draw_shape
    from flyray.clip.pyfunc import log_pyfunc as log_clip

    torch.manual_seed(0)
    labels = sorted(CLASSES)
    classifier = TrainedClassifier(ClipClassifier(32, 3, hidden=16).eval(), labels, tiny_clip,
                                   ClassifierParams(hidden=16))  # fmt: skip
    classifier.save(str(tmp_path / "classifier"))
    with mlflow.start_run():
        info = log_clip(str(tmp_path / "classifier"), classifier, np.zeros((2, 32), np.float32),
                        registered_name="serve-clip")  # fmt: skip
    promote("serve-clip", str(info.registered_model_version), 0.9)
    rng = np.random.default_rng(0)
    pictures = []
    for label in CLASSES:
        out = io.BytesIO()
        draw_shape(label, rng).save(out, format="PNG")
        pictures.append(out.getvalue())
    want = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": pictures}))
    url = server("serve-clip") + "/serve-clip/classify"
    status, answer = call(url, {"images": [base64.b64encode(p).decode() for p in pictures]})
    assert status == 200 and answer["model_version"] == str(info.registered_model_version)
    assert [p["label"] for p in answer["predictions"]] == want.label.tolist()
    np.testing.assert_allclose([p["score"] for p in answer["predictions"]], want.score,
                               rtol=1e-5)  # fmt: skip
    status, answer = call(url, {"images": ["bm90IGFuIGltYWdl"]})  # "not an image"
    assert (status, answer["field"]) == (422, "images[0]")
