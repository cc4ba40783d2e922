"""Binary classification on parquet tables: validation and split (data), XGBoost in one process
or on Ray Train (train), held-out metrics (evaluate). Plain Python, no Flyte.

No re-exports: Ray Train workers import flyray.tabular.train and should not pay for
scikit-learn (evaluate) on every worker start."""
