"""Ray Serve: one application per registered model name, at /<model name>, serving the version
that holds the champion alias and following it (flyray.serve.models.ChampionFollower).

Routes (POST, JSON unless said; GET /<name>/ describes the model):
  recommender  /recommend {"user_ids": [...], "n": 10}
               /score {"user_ids": [...], "item_ids": [...]} (pairs, position by position)
  XGBoost      /predict {"rows": [{feature: value, ...}]}
  CNN, CLIP    /classify multipart/form-data (one or more `image` files) or {"images": [base64]}
Every answer carries "model_version". Bad input: 4xx {"error", "field"}; never a traceback.

`build` is the import path a Serve config (and so a RayService) names:
  import_path: flyray.serve.app:build, args: {model_name: flyray-funksvd}
"""

from __future__ import annotations

import json
import logging

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from flyray.bounds import json_depth
from flyray.serve.models import (
    MAX_BODY_BYTES,
    MAX_IMAGES,
    MAX_JSON_DEPTH,
    BadRequest,
    ChampionFollower,
    Recommender,
    decode_images,
    json_images,
)

log = logging.getLogger(__name__)

# Top-k requests waiting while the model computes share its next call (up to 64 of them); no
# extra wait, so a lone request is answered at once.
BATCH_SIZE, BATCH_WAIT_S = 64, 0.0


@serve.deployment(max_ongoing_requests=256)
class Champion:
    def __init__(self, model_name: str, tracking_uri: str, poll_seconds: float = 10.0) -> None:
        logging.basicConfig(level=logging.INFO)
        self.follower = ChampionFollower(model_name, tracking_uri, poll_seconds)
        self.model_name = model_name

    async def __call__(self, request: Request) -> JSONResponse:
        loaded = self.follower.current  # this request's model, whatever a promotion does
        route = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        try:
            if loaded is None:
                raise BadRequest(
                    "model", f"{self.model_name} has no champion yet; it is served once a "
                    "version takes the alias", 503,
                )  # fmt: skip
            if route in ("", self.model_name) and request.method == "GET":
                return JSONResponse(self._describe(loaded))
            if route not in loaded.model.routes:
                raise BadRequest(
                    "path", f"no route /{route}; this model answers "
                    f"{['/' + r for r in loaded.model.routes]}", 404,
                )  # fmt: skip
            if request.method != "POST":
                raise BadRequest("method", f"/{route} takes POST", 405)
            if route == "recommend":
                request_ = Recommender.parse_recommend(await _json(request))
                version, rows = await self._recommend(request_)
                return JSONResponse({"model_version": version, "recommendations": rows})
            if route == "score":
                answer = loaded.model.score(await _json(request))
            elif route == "predict":
                answer = loaded.model.predict(await _json(request))
            else:  # classify
                answer = loaded.model.classify(*decode_images(*await _images(request)))
            return JSONResponse({"model_version": loaded.version, **answer})
        except BadRequest as err:
            return JSONResponse(err.body(), status_code=err.status)
        except Exception:  # logged in full here; the client gets no traceback
            log.exception("serve: %s /%s failed", self.model_name, route)
            return JSONResponse({"error": "internal error; see the server log"}, status_code=500)

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _recommend(self, requests: list) -> list:
        loaded = self.follower.current  # one model for the whole batch
        answers = loaded.model.recommend(requests)
        return [(loaded.version, rows) for rows in answers]

    def _describe(self, loaded) -> dict:
        return {
            "model_name": self.model_name,
            "model_version": loaded.version,
            "kind": type(loaded.model).__name__,
            "routes": [f"/{self.model_name}/{r}" for r in loaded.model.routes],
        }


async def _body(request: Request) -> bytes:
    """The body, read only up to MAX_BODY_BYTES: a larger one is refused (413) from its
    Content-Length, or as soon as the stream passes the limit; kept where Starlette keeps a
    body it has read, so that form() parses it from memory."""
    too_large = BadRequest("body", f"over the limit of {MAX_BODY_BYTES:,} bytes", 413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    request._body = b"".join(chunks)  # Starlette's own cache of a body read (Request.body)
    return request._body


async def _json(request: Request) -> object:
    body = await _body(request)
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise BadRequest("body", f"JSON nested {depth:,} deep, over the limit of "
                         f"{MAX_JSON_DEPTH}", 400)  # fmt: skip
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise BadRequest("body", f"not valid JSON: {err}", 400) from None


async def _images(request: Request) -> tuple[list, str]:
    """Images of a multipart upload (`image` fields) or of a JSON body."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        await _body(request)  # bounded; form() then parses it from memory
        async with request.form(max_files=MAX_IMAGES) as form:
            files = form.getlist("image")
            if not files:
                raise BadRequest("image", "multipart upload has no `image` file field", 422)
            values = []
            for f in files:
                if isinstance(f, str):
                    raise BadRequest("image", "expected a file, got a text field")
                values.append(await f.read())
        return values, "image"
    return json_images(await _json(request)), "images"


def deployment(
    model_name: str, tracking_uri: str, poll_seconds: float = 10.0, replicas: int = 1,
    num_cpus: float = 0.25,
) -> Application:  # fmt: skip
    """The application serving `model_name`'s champion. A replica's CPU share is small: it
    mostly waits on the network, and several models share a node."""
    return Champion.options(
        name=model_name, num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus}
    ).bind(model_name, tracking_uri, poll_seconds)


def build(args: dict) -> Application:
    """Serve config builder: args model_name, and optionally tracking_uri (default: the
    environment's, as flyray.registry resolves it), poll_seconds, replicas, num_cpus."""
    from flyray.registry import tracking_uri

    return deployment(
        args["model_name"], args.get("tracking_uri") or tracking_uri(),
        float(args.get("poll_seconds", 10.0)), int(args.get("replicas", 1)),
        float(args.get("num_cpus", 0.25)),
    )  # fmt: skip


def run(
    names: list[str], tracking_uri: str, host: str = "127.0.0.1", port: int = 8000,
    poll_seconds: float = 10.0, replicas: int = 1,
) -> dict[str, str]:  # fmt: skip
    """Start Serve's HTTP proxy on host:port (on the connected Ray) and one application per
    name; returns name -> URL."""
    serve.start(http_options={"host": host, "port": port})
    for name in names:
        serve.run(
            deployment(name, tracking_uri, poll_seconds, replicas), name=name,
            route_prefix=f"/{name}",
        )  # fmt: skip
    return {name: f"http://{host}:{port}/{name}" for name in names}
