"""The CNN of the original exercise: three convolutional blocks, then a small dense head."""

from __future__ import annotations

from dataclasses import dataclass, field

import flyray.vision  # noqa: F401  (sets TF_USE_LEGACY_KERAS before tensorflow loads)


@dataclass
class CNNParams:
    """What both runs share, so their times and accuracies are comparable."""

    epochs: int = 10
    global_batch_size: int = 64  # per step over all workers; each worker takes its share
    learning_rate: float = 1e-3
    seed: int = 0
    filters: list[int] = field(default_factory=lambda: [32, 64, 128])  # one per conv block
    dense_units: int = 128
    dropout: float = 0.3


def build_cnn(input_shape: tuple[int, int, int], num_classes: int, params: CNNParams):
    """Compiled tf_keras model taking raw 0..255 pixels (rescaled inside the model)."""
    import tf_keras as keras  # Keras 2: see flyray/vision/__init__.py

    layers = [keras.Input(shape=input_shape), keras.layers.Rescaling(1 / 255)]
    for filters in params.filters:
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(filters, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [
        keras.layers.Flatten(),
        keras.layers.Dense(params.dense_units, activation="relu"),
        keras.layers.Dropout(params.dropout, seed=params.seed),
        keras.layers.Dense(num_classes, activation="softmax"),
    ]
    model = keras.Sequential(layers, name="cnn3")
    model.compile(
        optimizer=keras.optimizers.Adam(params.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
