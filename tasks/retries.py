"""Which failures a retry can outlive: transient errors become Flyte's recoverable ones (the
task preamble, tasks/platform.py), bad input fails at once."""

from __future__ import annotations

# What a flaky store, network or lost node looks like; bad input never matches these.
_TRANSIENT_TYPES = (ConnectionError, TimeoutError)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ObjectLostError",
    "OwnerDiedError", "NodeDiedError", "ObjectReconstructionFailedError",
}  # fmt: skip
_TRANSIENT_TEXT = (
    "NETWORK_CONNECTION", "curlCode", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE",
    "Connection refused", "Connection reset", "timed out", "Max retries exceeded",
    "503 Server Error", "502 Server Error", "504 Server Error",
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """True when the error, or one it was raised from (Ray task errors included), is a network,
    storage-service or node failure that a retry can outlive."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        names = {t.__name__ for t in type(e).__mro__}
        if isinstance(e, _TRANSIENT_TYPES) or names & _TRANSIENT_NAMES:
            return True
        if isinstance(e, OSError) and any(t in str(e) for t in _TRANSIENT_TEXT):
            return True
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    return False
