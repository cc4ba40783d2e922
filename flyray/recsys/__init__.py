"""Recommendation: one factor-model interface (FactorModel) and the trainers that produce it."""

from flyray.recsys.funksvd import FunkSVD, FunkSVDParams
from flyray.recsys.model import FactorModel, Ratings

__all__ = ["FactorModel", "FunkSVD", "FunkSVDParams", "Ratings"]
