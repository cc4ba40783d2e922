"""MLflow models-from-code entry of the recommender pyfunc (flyray/recsys/pyfunc.py): MLflow runs
this file to build the model when it is logged and loaded, so nothing is pickled."""

from mlflow.models import set_model

from flyray.recsys.pyfunc import FactorPyfunc

set_model(FactorPyfunc())
