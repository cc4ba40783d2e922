"""MLflow models-from-code entry of the CLIP pyfunc (flyray/clip/pyfunc.py): MLflow runs this file
to build the model when it is logged and loaded, so nothing is pickled."""

from mlflow.models import set_model

from flyray.clip.pyfunc import ClipPyfunc

set_model(ClipPyfunc())
