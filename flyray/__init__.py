"""flyray's pure compute: no flytekit here. Importing it quiets Ray's and MLflow's own console
output before they are imported (see flyray.console; FLYRAY_LOG_LEVEL=DEBUG keeps it)."""

from flyray import console

console.quiet_libraries()
