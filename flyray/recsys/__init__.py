"""Recommendation models: FunkSVD (biased matrix factorisation) and its distributed training."""

from flyray.recsys.funksvd import FunkSVD, FunkSVDParams

__all__ = ["FunkSVD", "FunkSVDParams"]
