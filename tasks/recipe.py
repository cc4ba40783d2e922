"""A workflow's inputs, recorded with the version it registers, so `make reproduce` can run the
same workflow again (docs/platform.md#reproduce). A Flyte task sees only its own inputs, never
its workflow's, so each workflow's first node is a recipe task with the workflow's own
interface: it returns the resolved inputs as JSON, and the register task records it.
"""

from __future__ import annotations

import inspect
import json

from mashumaro.codecs.basic import decode, encode

from tasks.platform import flyray_task, minutes


def recipe_task(workflow, image, name: str):
    """A task called `name` (the module variable it is assigned to, where Flyte's resolver finds
    it) in the workflow's module, taking the workflow's inputs and returning their recipe.
    The workflow calls it first with `**locals()`; it is built after the workflow is declared,
    which works because flytekit compiles a workflow on first use."""
    hints = workflow.python_interface.inputs
    module = workflow.name.rsplit(".", 1)[0]

    def record(**inputs) -> str:
        return encode_recipe(workflow.name, inputs, hints)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter(n, keyword, annotation=t) for n, t in hints.items()]
    record.__signature__ = inspect.Signature(parameters, return_annotation=str)
    record.__annotations__ = {**hints, "return": str}
    record.__module__, record.__name__, record.__qualname__ = module, name, name
    record.__doc__ = f"The inputs of {workflow.name}, as the recipe its registered version records."
    return flyray_task(image, storage=False, retries=1, timeout=minutes(5))(record)


def encode_recipe(workflow: str, inputs: dict, hints: dict) -> str:
    """{"workflow": module.name, "inputs": {name: JSON value}}: dataclasses as objects,
    datetimes in ISO 8601 (mashumaro, flytekit's own dataclass codec)."""
    values = {name: encode(value, hints[name]) for name, value in sorted(inputs.items())}
    return json.dumps({"workflow": workflow, "inputs": values}, sort_keys=True)


def typed_inputs(workflow, values: dict, what: str = "inputs") -> dict:
    """JSON values (a recipe's, or a command line's) as `workflow`'s typed inputs; an unknown
    name or a bad value is an error naming it."""
    types = workflow.python_interface.inputs
    unknown = set(values) - set(types)
    if unknown:
        known = sorted(types)
        raise ValueError(f"{what}: unknown {sorted(unknown)}; {workflow.name} takes {known}")
    typed = {}
    for name, value in values.items():
        try:
            typed[name] = decode(value, types[name])
        except Exception as err:  # mashumaro raises its own errors per type
            raise ValueError(f"{what}: {name}={value!r} is not a {types[name]} ({err})") from None
    return typed
