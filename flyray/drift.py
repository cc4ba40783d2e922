"""How far a run's training data drifted from the data its champion learned from
(docs/platform.md#drift).

Every registration profiles its data (`Profile`: named distributions, each numeric values in
bins or categories with their shares) and stores the profile with the version (the run's
`drift/profile.json`). The next registration compares its data with the champion's profile by
the population stability index of each distribution, on the champion's own bins:

    PSI(e, a) = sum_i (a_i - e_i) ln(a_i / e_i)      e, a: the shares of bin i, smoothed by 1e-4

(the symmetric Kullback-Leibler divergence: scipy's `entropy(a, e) + entropy(e, a)`). By the
usual reading, under 0.1 is no change, 0.1-0.25 a moderate one, over 0.25 a large one; the
threshold is `RegistryConfig.drift_threshold` (0.2). Drift never decides the gate by itself;
with `hold_on_drift` the champion stays when the data drifted past the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

EPSILON = 1e-4  # share given to a bin one side never saw, so that ln stays finite
OTHER = "(other)"


@dataclass
class Distribution:
    """One distribution: `edges` (numeric: the bins' inner edges, quantiles of the data that
    profiled it) or none (categorical), and each bin's or category's share."""

    shares: dict[str, float]
    edges: list[float] = field(default_factory=list)

    @property
    def numeric(self) -> bool:
        return bool(self.edges)


def numeric(values: np.ndarray, bins: int = 10) -> Distribution:
    """Deciles (by default) of `values`: the bins a later run is measured on."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Distribution({})
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return Distribution(
        _shares(np.searchsorted(edges, values, side="right"), len(edges)), list(edges)
    )


def categorical(counts: Mapping[str, float], top: int = 1000) -> Distribution:
    """The `top` largest categories' shares, the rest pooled as OTHER."""
    total = float(sum(counts.values()))
    if total <= 0:
        return Distribution({})
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    shares = {str(k): v / total for k, v in ranked[:top]}
    rest = sum(v for _, v in ranked[top:]) / total
    if rest > 0:
        shares[OTHER] = rest
    return Distribution(shares)


def _shares(codes: np.ndarray, n_edges: int) -> dict[str, float]:
    counts = np.bincount(codes, minlength=n_edges + 1)
    return {str(i): float(c) / max(1, codes.size) for i, c in enumerate(counts)}


@dataclass
class Column:
    """What a workload hands over to be profiled: numeric values, or category counts."""

    values: np.ndarray | None = None
    counts: dict[str, float] | None = None


def profile(columns: Mapping[str, Column]) -> dict[str, Distribution]:
    return {
        name: numeric(c.values) if c.values is not None else categorical(c.counts or {})
        for name, c in columns.items()
    }


def psi(expected: Mapping[str, float], actual: Mapping[str, float]) -> float:
    """The population stability index of two sets of shares over the union of their bins."""
    from scipy.stats import entropy

    bins = sorted(set(expected) | set(actual))
    e = np.array([max(expected.get(b, 0.0), EPSILON) for b in bins])
    a = np.array([max(actual.get(b, 0.0), EPSILON) for b in bins])
    e, a = e / e.sum(), a / a.sum()
    return float(entropy(a, e) + entropy(e, a))


def _on_reference(reference: Distribution, column: Column) -> dict[str, float]:
    """The column's shares on the reference's bins (numeric) or categories (the rest pooled
    as OTHER, as the reference pooled its own)."""
    if reference.numeric:
        values = np.asarray(column.values, dtype=np.float64)
        values = values[np.isfinite(values)]
        codes = np.searchsorted(np.asarray(reference.edges), values, side="right")
        return _shares(codes, len(reference.edges))
    counts = column.counts or {}
    total = float(sum(counts.values())) or 1.0
    shares = {k: 0.0 for k in reference.shares}
    for key, value in counts.items():
        key = str(key)
        target = key if key in reference.shares else OTHER
        shares[target] = shares.get(target, 0.0) + value / total
    return shares


@dataclass
class Drift:
    """A run's data against its champion's: PSI per distribution, the largest, the verdict."""

    against: str  # the champion version compared with
    threshold: float
    psi: dict[str, float]

    @property
    def largest(self) -> tuple[str, float]:
        return max(self.psi.items(), key=lambda kv: kv[1]) if self.psi else ("", 0.0)

    @property
    def drifted(self) -> bool:
        return self.largest[1] >= self.threshold

    def summary(self) -> str:
        name, value = self.largest
        verdict = "drifted" if self.drifted else "within"
        return (
            f"data drift vs v{self.against}: PSI {value:.3f} ({name}), {verdict} the threshold "
            f"{self.threshold:g}"
        )

    def tags(self) -> dict[str, str]:
        name, value = self.largest
        return {
            "drift.against": self.against,
            "drift.max_psi": f"{value:.4f}",
            "drift.max_psi_of": name,
            "drift.threshold": f"{self.threshold:g}",
            "drift.drifted": str(self.drifted).lower(),
        }


def compare(
    reference: Mapping[str, Distribution],
    columns: Mapping[str, Column],
    against: str,
    threshold: float,
) -> Drift:
    """PSI of every distribution both sides have, measured on the reference's bins."""
    values = {
        name: psi(ref.shares, _on_reference(ref, columns[name]))
        for name, ref in reference.items()
        if name in columns and ref.shares
    }
    return Drift(against, threshold, values)


def to_json(distributions: Mapping[str, Distribution]) -> dict:
    return {name: asdict(d) for name, d in distributions.items()}


def from_json(document: Mapping[str, dict]) -> dict[str, Distribution]:
    return {
        name: Distribution(dict(d["shares"]), list(d.get("edges", [])))
        for name, d in document.items()
    }


def chart_html(psi_by_name: Mapping[str, float], threshold: float, title: str) -> str:
    """PSI per distribution as bars, the threshold as a line (the registry deck)."""
    import matplotlib.pyplot as plt

    from flyray.decks import figure_html

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(psi_by_name)
    colors = ["#c44e52" if psi_by_name[n] >= threshold else "#4c72b0" for n in names]
    ax.bar(names, [psi_by_name[n] for n in names], color=colors)
    ax.axhline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_ylabel("PSI vs the champion's data")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(loc="upper right")
    return figure_html(fig)
