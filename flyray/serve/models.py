"""The registered champions as servable models: what each workload answers over HTTP, the checks
that turn bad input into a 4xx naming the field, and the follower that swaps in a newly promoted
version. No Ray here: flyray.serve.app wraps these in Ray Serve deployments.

A model's kind comes from its own MLmodel: the xgboost flavor is the tabular classifier, the
tensorflow flavor the CNN, a pyfunc whose signature takes `user_id` a recommender (FunkSVD or
any model with the same interface) and one that takes `image` the CLIP classifier.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flyray.bounds import image_size_error
from flyray.registry import CHAMPION

log = logging.getLogger(__name__)

# Bounds on a request (docs/serving.md#limits): each is checked before the work it bounds.
MAX_BODY_BYTES = 16 << 20  # 413 past it, before the body is read whole
MAX_JSON_DEPTH = 32  # objects and arrays inside each other; 400 past it, before parsing
MAX_USERS = 1_000  # per /recommend or /score request
MAX_N = 1_000  # items per user
MAX_RESULTS = 100_000  # users x n per /recommend request (a batch of 64: 6.4 M at most)
MAX_ROWS = 10_000  # per tabular request
MAX_IMAGES = 64  # per image request
MAX_IMAGE_PIXELS = 4_000_000  # per image (2000 x 2000; the models see 32 or 224 pixels a side)
MAX_REQUEST_PIXELS = 16_000_000  # per request, all images together (48 MB decoded)
_NEVER_SEEN_USER = int(np.iinfo(np.int64).min)  # an id no clickstream has: the cold-start answer


class BadRequest(ValueError):
    """Input the model cannot take: answered with `status` and the field it is about."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status

    def body(self) -> dict:
        return {"error": str(self), "field": self.field}


# ----------------------------------------------------------------------------- input checks


def require(body: object, key: str) -> object:
    """body[key] of a JSON object body."""
    if not isinstance(body, dict):
        raise BadRequest("body", f"expected a JSON object, got {type(body).__name__}", 400)
    if key not in body:
        raise BadRequest(key, "is required")
    return body[key]


def int_list(value: object, name: str, limit: int) -> np.ndarray:
    """A non-empty list of integer ids (JSON numbers without a fraction) as int64."""
    if not isinstance(value, list) or not value:
        raise BadRequest(name, "expected a non-empty list of integer ids")
    if len(value) > limit:
        raise BadRequest(name, f"at most {limit} ids per request, got {len(value)}")
    for k, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise BadRequest(f"{name}[{k}]", f"expected an integer id, got {v!r}")
        if not -(2**63) < v < 2**63:
            raise BadRequest(f"{name}[{k}]", f"{v} is outside the 64-bit id range")
    return np.asarray(value, np.int64)


def bounded_int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(key, f"expected an integer from {lo} to {hi}, got {value!r}")
    return value


def decode_images(values: list[bytes | str], name: str = "images"):
    """Encoded images (bytes, or base64 text as JSON carries them) as RGB PIL images, with
    their bytes; a value that is not an image, or too large an image, names its position.
    Every size is read from its header before anything is decoded."""
    from flyray.images import decode, size

    if not values:
        raise BadRequest(name, "expected at least one image")
    if len(values) > MAX_IMAGES:
        raise BadRequest(name, f"at most {MAX_IMAGES} images per request, got {len(values)}")
    raw, pixels = [], 0
    for k, value in enumerate(values):
        if isinstance(value, str):
            try:
                value = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as err:
                raise BadRequest(f"{name}[{k}]", f"not base64: {err}") from None
        elif not isinstance(value, bytes):
            raise BadRequest(f"{name}[{k}]", f"expected a base64 string, got {value!r:.40}")
        try:
            width, height = size(value)
        except ValueError as err:
            raise BadRequest(f"{name}[{k}]", f"cannot read the image: {err}") from None
        too_large = image_size_error((width, height), MAX_IMAGE_PIXELS)
        if too_large:
            raise BadRequest(f"{name}[{k}]", too_large, 413)
        pixels += width * height
        raw.append(value)
    if pixels > MAX_REQUEST_PIXELS:
        raise BadRequest(name, f"{pixels:,} pixels in all, over the limit of "
                         f"{MAX_REQUEST_PIXELS:,} per request", 413)  # fmt: skip
    images = []
    for k, value in enumerate(raw):
        try:
            images.append(decode(value, MAX_IMAGE_PIXELS))
        except ValueError as err:
            raise BadRequest(f"{name}[{k}]", f"cannot read the image: {err}") from None
    return images, raw


def json_images(body: object) -> list[str]:
    """{"images": [base64, ...]} or {"image": base64}."""
    if isinstance(body, dict) and "image" in body and "images" not in body:
        return [body["image"]]
    value = require(body, "images")
    if not isinstance(value, list):
        raise BadRequest("images", "expected a list of base64-encoded images")
    return value


# ----------------------------------------------------------------------------- the models


@dataclass
class Recommender:
    """A recommender pyfunc (user_id [, item_id] in; user_id, rank, item_id, score out)."""

    model: mlflow.pyfunc.PyFuncModel
    routes = ("recommend", "score")
    _cold: dict[int, tuple[list, list]] = field(default_factory=dict)

    def cold_answer(self, n: int) -> tuple[list, list]:
        """The answer for a user the model never saw (its cold-start list), per n. The pyfunc's
        interface does not say whether it knew a user, but every unknown user gets this same
        list: a user whose answer is exactly it is one the model treats as unknown."""
        if n not in self._cold:
            top = self.model.predict(pd.DataFrame({"user_id": [_NEVER_SEEN_USER]}), {"n": n})
            self._cold[n] = (top["item_id"].tolist(), top["score"].tolist())
        return self._cold[n]

    @staticmethod
    def parse_recommend(body: object) -> tuple[np.ndarray, int]:
        users = int_list(require(body, "user_ids"), "user_ids", MAX_USERS)
        n = bounded_int(body, "n", 10, 1, MAX_N)
        if len(users) * n > MAX_RESULTS:
            raise BadRequest("n", f"{len(users)} users x {n} items = {len(users) * n:,}, over "
                             f"the limit of {MAX_RESULTS:,} per request")  # fmt: skip
        return users, n

    def recommend(self, requests: list[tuple[np.ndarray, int]]) -> list[list[dict]]:
        """Top-n items for every request's users; requests asking the same n share one predict
        call (what batching buys). A user whose answer is the cold-start list is flagged."""
        out: list = [None] * len(requests)
        for n in sorted({n for _, n in requests}):
            which = [k for k, (_, m) in enumerate(requests) if m == n]
            users = np.concatenate([requests[k][0] for k in which])
            top = self.model.predict(pd.DataFrame({"user_id": users}), {"n": n})
            starts = np.flatnonzero(top["rank"].to_numpy() == 1).tolist() + [len(top)]
            items, scores = top["item_id"].tolist(), top["score"].tolist()
            cold_items, cold_scores = self.cold_answer(n)
            rows = []
            for j, user in enumerate(users.tolist()):
                a, b = starts[j], starts[j + 1]
                its, scs = items[a:b], scores[a:b]
                cold = its == cold_items and scs == cold_scores
                rows.append({"user_id": user, "items": its, "scores": scs, "cold_start": cold})
            at = 0
            for k in which:
                size = len(requests[k][0])
                out[k], at = rows[at : at + size], at + size
        return out

    def score(self, body: object) -> dict:
        users = int_list(require(body, "user_ids"), "user_ids", MAX_USERS)
        items = int_list(require(body, "item_ids"), "item_ids", MAX_USERS)
        if len(items) != len(users):
            raise BadRequest(
                "item_ids", f"expected {len(users)} ids, one per user_ids entry; got {len(items)}"
            )
        frame = self.model.predict(pd.DataFrame({"user_id": users, "item_id": items}))
        return {
            "scores": [
                {"user_id": u, "item_id": i, "score": s}
                for u, i, s in zip(
                    users.tolist(), items.tolist(), frame["score"].tolist(), strict=True
                )  # fmt: skip
            ]
        }


@dataclass
class Tabular:
    """An XGBoost booster and its recorded encoding: rows in the training table's schema (raw
    categorical values) in, the positive class's probability out."""

    booster: object
    spec: object  # flyray.tabular.data.TableSpec
    routes = ("predict",)

    def predict(self, body: object) -> dict:
        import pyarrow as pa

        from flyray.tabular.data import encode_features
        from flyray.tabular.train import predict

        rows = require(body, "rows")
        if not isinstance(rows, list) or not rows:
            raise BadRequest("rows", "expected a non-empty list of objects, one per row")
        if len(rows) > MAX_ROWS:
            raise BadRequest("rows", f"at most {MAX_ROWS} rows per request, got {len(rows)}")
        features, categories = self.spec.features, self.spec.categories
        for k, row in enumerate(rows):
            if not isinstance(row, dict):
                raise BadRequest(f"rows[{k}]", f"expected an object of {features}")
            unknown = [c for c in row if c not in features]
            if unknown:
                raise BadRequest(f"rows[{k}].{unknown[0]}", f"not a feature; features: {features}")
            missing = [c for c in features if c not in row]
            if missing:
                raise BadRequest(
                    f"rows[{k}].{missing[0]}", "missing (send null for a missing value)"
                )
        columns = {}
        for name in features:
            values = [row[name] for row in rows]
            if name in categories:
                bad = next((k for k, v in enumerate(values) if isinstance(v, list | dict)), None)
                kind = "a category (string or number) or null"
            else:
                bad = next((k for k, v in enumerate(values) if not _number(v)), None)
                kind = "a number or null"
            if bad is not None:
                raise BadRequest(f"rows[{bad}].{name}", f"expected {kind}, got {values[bad]!r}")
            try:
                columns[name] = pa.array(values, None if name in categories else pa.float64())
            except (pa.ArrowException, TypeError, ValueError) as err:
                raise BadRequest(f"rows[*].{name}", f"values of mixed types: {err}") from None
        table = pa.table(columns)
        encoded = encode_features(table, self.spec)
        x = np.column_stack([encoded[f].to_numpy(zero_copy_only=False) for f in features])
        probabilities = predict(self.booster, self.spec, x.astype(np.float32)).tolist()
        negative, positive = self.spec.label_classes
        predictions = []
        for k, p in enumerate(probabilities):
            unseen = {
                name: rows[k][name]
                for name in categories
                if rows[k][name] is not None and math.isnan(x[k, features.index(name)])
            }
            answer = {"probability": p, "class": positive if p >= 0.5 else negative}
            if unseen:  # encoded as missing, as in training: the answer deserves a flag
                answer["unknown_categories"] = unseen
            predictions.append(answer)
        return {"label": self.spec.label, "classes": [negative, positive],
                "predictions": predictions}  # fmt: skip


def _number(v: object) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


@dataclass
class KerasClassifier:
    """The CNN (tensorflow flavor): raw RGB pixels in, softmax over its classes out."""

    model: object
    class_names: list[str]
    routes = ("classify",)

    def classify(self, images: list, raw: list[bytes]) -> dict:
        from flyray.vision.data import _pixels  # the resize the image-folder loader applies

        size = self.model.input_shape[1]
        x = np.stack([_pixels(image, size) for image in images])
        probs = np.asarray(self.model(x, training=False))
        best = probs.argmax(1)
        return {"predictions": [{"label": self.class_names[k], "score": float(probs[j, k])}
                                for j, k in enumerate(best.tolist())]}  # fmt: skip


@dataclass
class ClipModel:
    """The CLIP pyfunc: encoded images in, (label, score) out."""

    model: mlflow.pyfunc.PyFuncModel
    routes = ("classify",)

    def classify(self, images: list, raw: list[bytes]) -> dict:
        frame = self.model.predict(pd.DataFrame({"image": raw}))
        return {"predictions": [{"label": label, "score": float(score)}
                                for label, score in zip(frame["label"], frame["score"],
                                                        strict=True)]}  # fmt: skip


Served = Recommender | Tabular | KerasClassifier | ClipModel


def load(model_uri: str) -> Served:
    """The model at `model_uri` (models:/name/version) as the kind its MLmodel says it is."""
    info = mlflow.models.get_model_info(model_uri)
    flavors = info.flavors
    inputs = info.signature.inputs.input_names() if info.signature else []
    if "xgboost" in flavors:
        from flyray.tabular.evaluate import load_registered

        return Tabular(*load_registered(model_uri))
    if "tensorflow" in flavors:
        import flyray.vision  # noqa: F401  (Keras 2 before tensorflow loads)

        model = mlflow.tensorflow.load_model(model_uri)
        shape = model.input_shape
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
            raise ValueError(f"{model_uri}: expected square RGB inputs, the model takes {shape}")
        classes = model.output_shape[-1]
        names = (info.metadata or {}).get("class_names") or [str(k) for k in range(classes)]
        return KerasClassifier(model, list(names))
    if "user_id" in inputs:
        return Recommender(mlflow.pyfunc.load_model(model_uri))
    if "image" in inputs:
        return ClipModel(mlflow.pyfunc.load_model(model_uri))
    raise ValueError(
        f"{model_uri}: no server for flavors {sorted(flavors)} with inputs {inputs}: expected an "
        "xgboost or tensorflow model, or a pyfunc taking user_id or image"
    )


# ----------------------------------------------------------------------------- the registry


def champions(tracking_uri: str) -> dict[str, str]:
    """Registered model name -> the version holding the champion alias, for every name that has
    one."""
    client = MlflowClient(tracking_uri)
    found, token = {}, None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        for model in page:
            if CHAMPION in (model.aliases or {}):
                found[model.name] = str(model.aliases[CHAMPION])
        token = page.token
        if not token:
            return dict(sorted(found.items()))


@dataclass
class Loaded:
    version: str
    model: Served
    loaded_at: float = field(default_factory=time.time)


class ChampionFollower:
    """The champion of one registered model, kept current (None while it has none): a thread
    asks the registry which version holds the alias every `poll_seconds`, loads a new one
    beside the old and swaps the reference in one assignment, so a request in flight finishes
    on the model it started with and none fails during a promotion. A version that fails to
    load leaves the old one serving.
    """

    def __init__(self, model_name: str, tracking_uri: str, poll_seconds: float = 10.0) -> None:
        self.model_name, self.tracking_uri, self.poll_seconds = (
            model_name, tracking_uri, poll_seconds,
        )  # fmt: skip
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        version = self._champion_version()
        # None until the name has a champion (a RayService may list a workload not yet trained)
        self.current: Loaded | None = self._load(version) if version is not None else None
        self._failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"follow-{model_name}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def _champion_version(self) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.model_name, CHAMPION).version)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "alias" in str(err).lower():
                return None
            raise

    def _load(self, version: str) -> Loaded:
        began = time.perf_counter()
        loaded = Loaded(version, load(f"models:/{self.model_name}/{version}"))
        log.info("serve: %s v%s loaded in %.1fs", self.model_name, version,
                 time.perf_counter() - began)  # fmt: skip
        return loaded

    def check(self) -> bool:
        """One poll: load and switch to the alias's version if it moved; True if it switched."""
        version = self._champion_version()
        serving = self.current.version if self.current is not None else None
        if version is None or version in (serving, self._failed):
            return False
        try:
            self.current = self._load(version)  # the swap: one reference assignment
        except Exception as err:  # keep serving the old version; say why once per version
            self._failed = version
            log.warning("serve: %s v%s did not load (serving: v%s): %s",
                        self.model_name, version, serving, err)  # fmt: skip
            return False
        return True

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception as err:  # the registry unreachable for a while: try again later
                log.warning("serve: %s: cannot ask the registry: %s", self.model_name, err)

    def stop(self) -> None:
        self._stop.set()
