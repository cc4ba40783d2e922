"""CLIP image classification: embeddings on a Ray Data actor pool, a small torch classifier
trained with Ray Train, batch-inference evaluation and an MLflow pyfunc. No Flyte here."""
