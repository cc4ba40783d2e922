"""The MLflow server's authentication on a cluster: MLflow's basic-auth app, flyray's identities,
and the one rule basic-auth cannot express (docs/deploy.md#mlflow-identities).

`mlflow server --app-name flyray-auth` (the `mlflow.app` entry point in pyproject.toml) serves
MLflow's own basic-auth app: its users and hashed passwords in Postgres, its per-resource grants,
401 to anonymous requests. Why not an OIDC proxy in front: flyray's clients are pods, not
browsers, and MLflow's client speaks basic auth natively (MLFLOW_TRACKING_USERNAME/PASSWORD);
a proxy would also see only URLs, while the rule below needs MLflow's own request table. The rule:
in basic-auth, EDIT on a registered model covers both registering a version and moving an alias,
so a pipeline could promote its own model. Here, on top of basic-auth's grants:

  moving or deleting an alias, writing a gate tag     flyray-gate only
  creating or deleting a gate lock (`<model>.gate-lock`, flyray.registry.gate_lock)
                                                      flyray-gate only
  creating an experiment or a registered model        flyray-pipeline only
  deleting or renaming a model or a version           the admin only

`python -m flyray.registry_auth` (k8s/mlflow.yaml runs it before the server) creates the
identities with the passwords their Secrets hold and grants each what it needs; everyone else
(and every identity, where not granted more) reads (default_permission READ):

  flyray-pipeline  EDIT on experiments and registered models: log runs, register versions
  flyray-gate      EDIT on registered models: the gate's tags and the champion alias; its lock
  flyray-serving   READ: load the champion
  flyray-people    READ: the UI
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping

from flask import Flask, Response, g, make_response, request

from flyray.registry import GATE_LOCK_SUFFIX, GATE_TAG_PREFIXES

PIPELINE, GATE = "flyray-pipeline", "flyray-gate"
SERVING, PEOPLE = "flyray-serving", "flyray-people"
# identity -> the variable its password comes in (from its Secret), and its grants
IDENTITIES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    PIPELINE: (
        "FLYRAY_MLFLOW_PIPELINE_PASSWORD",
        (("experiment", "EDIT"), ("registered_model", "EDIT")),
    ),
    GATE: ("FLYRAY_MLFLOW_GATE_PASSWORD", (("registered_model", "EDIT"),)),
    SERVING: ("FLYRAY_MLFLOW_SERVING_PASSWORD", ()),
    PEOPLE: ("FLYRAY_MLFLOW_PEOPLE_PASSWORD", ()),
}


# A request field whose value makes the request the gate's own (flyray-gate only), and what it
# does then: the gate trusts its tags when it reads the champion, and its lock makes gates on
# one model take turns.
GATES_OWN: dict[str, tuple[Callable[[str], bool], str]] = {
    "key": (lambda key: key.startswith(GATE_TAG_PREFIXES), "write the gate's tag {!r}"),
    "name": (lambda name: name.endswith(GATE_LOCK_SUFFIX), "take or release the gate's lock {!r}"),
}


def _rules() -> dict[tuple[str, str], tuple[str, frozenset[str] | None, str | None]]:
    """(path, method) -> (what the request does, the identities that may (None: any with
    basic-auth's grant), the field that can make it the gate's own) from MLflow's own endpoint
    table, so every path and method of each request type is covered."""
    from mlflow.protos import model_registry_pb2 as registry
    from mlflow.protos import service_pb2 as tracking
    from mlflow.server.handlers import get_endpoints

    only = {
        registry.SetRegisteredModelAlias: ("move an alias", {GATE}, None),
        registry.DeleteRegisteredModelAlias: ("move an alias", {GATE}, None),
        registry.SetModelVersionTag: ("write a version tag", None, "key"),
        registry.DeleteModelVersionTag: ("write a version tag", None, "key"),
        tracking.CreateExperiment: ("create an experiment", {PIPELINE}, None),
        registry.CreateRegisteredModel: ("create a registered model", {PIPELINE}, "name"),
        registry.DeleteRegisteredModel: ("delete a registered model", set(), "name"),
        registry.RenameRegisteredModel: ("rename a registered model", set(), None),
        registry.DeleteModelVersion: ("delete a model version", set(), None),
    }
    table = {}
    for path, request_class, methods in get_endpoints(lambda request_class: request_class):
        if request_class in only:
            what, allowed, field = only[request_class]
            for method in methods:
                table[(path, method)] = (
                    what, None if allowed is None else frozenset(allowed), field
                )  # fmt: skip
    return table


def _refusal(what: str, allowed: frozenset[str]) -> Response:
    who = " or ".join(sorted(allowed)) or "the admin"
    response = make_response(f"Permission denied: only {who} may {what} (flyray.registry_auth)")
    response.status_code = 403
    return response


def install(app: Flask) -> None:
    """Add flyray's rule after basic-auth's checks (which authenticate the request first)."""
    from mlflow.server.auth import store

    table = _rules()

    def flyray_rule() -> Response | None:
        found = table.get((request.path, request.method))
        user = g.get("mlflow_authenticated_user")
        if found is None or user is None or store.get_user(user).is_admin:
            return None
        what, allowed, field = found
        if field is not None:
            body = request.get_json(silent=True) if request.is_json else None
            value = str((body or request.args).get(field, ""))
            owns, gates_what = GATES_OWN[field]
            if owns(value):
                what, allowed = gates_what.format(value), frozenset({GATE})
        if allowed is None:
            return None
        return None if user in allowed else _refusal(what, allowed)

    app.before_request(flyray_rule)


def create_app(app: Flask | None = None):
    """The `flyray-auth` app: MLflow's basic-auth app with flyray's rule."""
    from mlflow.server import app as mlflow_app
    from mlflow.server.auth import create_app as basic_auth

    app = app or mlflow_app
    served = basic_auth(app)  # the Flask app, or the FastAPI app wrapping it under uvicorn
    install(app)
    return served


def bootstrap(env: Mapping[str, str]) -> list[str]:
    """Create the admin and every identity (a changed Secret changes the password) and grant
    each its permissions; returns what was done, one line an identity, no secret in it."""
    from mlflow.server.auth import bootstrap_admin_user, store

    bootstrap_admin_user()
    done = []
    for username, (variable, grants) in IDENTITIES.items():
        password = env.get(variable, "")
        if not password:
            raise SystemExit(f"{variable} is not set: the password of {username} (its Secret)")
        if store.has_user(username, use_primary=True):
            store.update_user(username, password=password)
            action = "updated"
        else:
            store.create_user(username, password)
            action = "created"
        for resource, permission in grants:
            store.grant_user_permission(username, resource, "*", permission)
        granted = ", ".join(f"{p} on every {r}" for r, p in grants) or "READ (the default)"
        done.append(f"{username}: {action}; {granted}")
    return done


def main() -> int:
    for line in bootstrap(os.environ):
        print(f"flyray.registry_auth: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
