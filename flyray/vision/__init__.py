"""Image classification: a 3-block Keras CNN trained in one process and on Ray Train, compared.

Keras 3 under MultiWorkerMirroredStrategy fails on CPU (ray-project/ray#47464), so this package
pins Keras 2 (tf-keras 2.21, same version as tensorflow): TF_USE_LEGACY_KERAS=1 makes
`tf.keras` (and MLflow's tensorflow flavor) resolve to tf_keras. It is set here, before anything
imports tensorflow, and again in every Ray Train worker's runtime env.
"""

from __future__ import annotations

import os

LEGACY_KERAS_ENV = {"TF_USE_LEGACY_KERAS": "1"}
os.environ.update(LEGACY_KERAS_ENV)
