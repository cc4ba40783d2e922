"""Flyte tasks of the recommender after data preparation: train, evaluate, register, recommend."""

from __future__ import annotations

from typing import NamedTuple

from flytekit import StructuredDataset
from flytekit.types.directory import FlyteDirectory

import images
from flyray import storage
from flyray.clickstream.config import FeatureConfig
from flyray.clickstream.reports import DataProfile
from flyray.lineage import DataInput
from flyray.raytrain import DistributedConfig
from flyray.recsys import FactorModel, FunkSVDParams, Ratings, baselines, trainers
from flyray.recsys import report as rec
from flyray.recsys.batch import recommend_all
from flyray.recsys.evaluate import evaluate
from flyray.recsys.ials import IALSParams
from flyray.recsys.report import EvaluationReport, TrainingReport
from flyray.recsys.tuning import TuningConfig, TuningReport, tune_recommender
from flyray.registry import Registration, RegistryConfig
from tasks.clickstream import Ratings as RatingsDataset
from tasks.outputs import new_output_dir, publish, register, uri
from tasks.platform import flyray_task, minutes, sized_by_run


class TrainOutputs(NamedTuple):
    model: FlyteDirectory
    report: TrainingReport


# Defaults of the inputs that only a run with model="ials" or with tuning sets.
_UNUSED_IALS = IALSParams()
_NOT_TUNED = TuningReport("ndcg@10")


class TunedParams(NamedTuple):
    model: str
    funksvd: FunkSVDParams
    ials: IALSParams
    report: TuningReport


def _ratings(dataset: StructuredDataset) -> Ratings:
    table = storage.read_table(uri(dataset), ["user_idx", "item_idx", "rating"])
    return Ratings(*(table[c].to_numpy() for c in ("user_idx", "item_idx", "rating")))


def _ids(id_maps: FlyteDirectory, name: str, column: str):
    table = storage.read_table(storage.join(uri(id_maps), f"{name}.parquet"), [column])
    return table[column].to_numpy()


@flyray_task(images.recommender, ray=True, cache="tune-1", deck=True, timeout=minutes(180))
def tune_params(
    train_ratings: RatingsDataset,
    validation_ratings: RatingsDataset,
    id_maps: FlyteDirectory,
    model: str,
    params: FunkSVDParams,
    ials_params: IALSParams,
    config: TuningConfig,
) -> TunedParams:
    """Ray Tune search on validation NDCG, trials on this task's Ray cluster; the given model
    and parameters unchanged when config.trials = 0."""
    n_users = len(_ids(id_maps, "users", "user_id"))
    n_items = len(_ids(id_maps, "items", "item_id"))
    result = tune_recommender(
        _ratings(train_ratings), _ratings(validation_ratings), n_users, n_items, model, params,
        ials_params, config,
    )  # fmt: skip
    publish("tuning", *result.report.deck())
    return TunedParams(result.model, result.funksvd, result.ials, result.report)


@flyray_task(
    images.recommender, ray=DistributedConfig(), cache="train-4", deck=True,
    checkpoints="recommender", timeout=minutes(240),
)  # fmt: skip
def fit_recommender(
    train_ratings: RatingsDataset,
    validation_ratings: RatingsDataset,
    id_maps: FlyteDirectory,
    params: FunkSVDParams,
    config: DistributedConfig,
    model: str = "funksvd",
    ials_params: IALSParams = _UNUSED_IALS,
) -> TrainOutputs:
    """The trainer `model` picks (FunkSVD by DSGD, or iALS) over Ray workers; a Flyte retry
    resumes from the failed attempt's last checkpoint."""
    users, items = _ids(id_maps, "users", "user_id"), _ids(id_maps, "items", "item_id")
    fitted = trainers.fit(
        model, _ratings(train_ratings), _ratings(validation_ratings), users, items,
        trainers.params_of(model, params, ials_params), config,
    )  # fmt: skip
    out = fitted.save(storage.join(new_output_dir(), "model"))
    report = TrainingReport.of(fitted)
    publish("training", *rec.training_deck(report, fitted))
    return TrainOutputs(FlyteDirectory(out, remote_directory=False), report)


train_recommender = sized_by_run(fit_recommender, "train_recommender")


@flyray_task(images.recommender, cache="evaluate-4", deck=True, timeout=minutes(60))
def evaluate_model(
    model_dir: FlyteDirectory,
    train_ratings: RatingsDataset,
    test_ratings: RatingsDataset,
    params: FunkSVDParams,
    k: int,
    ranking_users: int,
) -> EvaluationReport:
    """Rating and ranking metrics of the model beside biases-only and popularity baselines;
    ranking metrics on at most `ranking_users` test users (0 = all; see flyray.recsys.evaluate)."""
    model = FactorModel.load(uri(model_dir))
    train_r, test_r = _ratings(train_ratings), _ratings(test_ratings)
    n_users, n_items = len(model.user_ids), len(model.item_ids)
    biases = baselines.biases(train_r, n_users, n_items, params)
    popularity = baselines.popularity(train_r, n_users, n_items)
    report = EvaluationReport(
        k,
        evaluate(model, test_r, k, "model", max_users=ranking_users),
        evaluate(biases, test_r, k, "biases", max_users=ranking_users),
        evaluate(popularity, test_r, k, "popularity", rating_metrics=False,
                 max_users=ranking_users),
    )  # fmt: skip
    publish("evaluation", *rec.evaluation_deck(report))
    return report


@flyray_task(images.recommender, cache="recommend-3", timeout=minutes(60))
def recommend_users(model_dir: FlyteDirectory, n: int) -> StructuredDataset:
    """Top-n unseen items for every user, as parquet (flyray.recsys.batch)."""
    out = storage.join(new_output_dir(), "recommendations")
    recommend_all(FactorModel.load(uri(model_dir)), out, n)
    return StructuredDataset(uri=out)


@flyray_task(images.recommender, deck=True, gate=True, timeout=minutes(30))
def register_model(
    model_dir: FlyteDirectory,
    train_ratings: RatingsDataset,
    test_ratings: RatingsDataset,
    training: TrainingReport,
    evaluation: EvaluationReport,
    profile: DataProfile,
    source: str,
    features: FeatureConfig,
    ranking_users: int,
    config: RegistryConfig,
    recipe: str,
    tuning: TuningReport = _NOT_TUNED,
) -> Registration:
    """The pyfunc in MLflow with the search that chose it, then the champion gate against
    popularity and the champion, which is scored on this model's own test split (same users)."""
    evidence = rec.candidate(
        FactorModel.load(uri(model_dir)), _ratings(train_ratings), _ratings(test_ratings),
        training, evaluation, profile, source, features, ranking_users, config.metric, tuning,
    )  # fmt: skip
    events = DataInput("clickstream", profile.source, profile.fingerprint, profile.window,
                       profile.events)  # fmt: skip
    return register(config, evidence, images.recommender, (events,), recipe)
