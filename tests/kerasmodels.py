"""A tiny Keras 3 transformer classifier trained here on a learnable token task, for the builds of
issue 16: token ids in, Embedding + positional embedding, MultiHeadAttention, LayerNormalization,
an exact-GELU block and an approximate-GELU block, pooled, softmax classes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 64
SEQ = 24
DIM = 32
CLASSES = 4
MARKERS = tuple(range(1, 1 + CLASSES))  # token ids that decide the class; the rest are noise


def token_task(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of noise tokens holding two marker tokens; the class is the marker that comes
    first, so the model must look at order (positions), not only at which tokens appear."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1 + CLASSES, VOCAB, size=(n, SEQ), dtype=np.int32)
    y = rng.integers(0, CLASSES, size=n)
    other = (y + rng.integers(1, CLASSES, size=n)) % CLASSES
    for i in range(n):
        a, b = sorted(rng.choice(SEQ, size=2, replace=False))
        x[i, a], x[i, b] = MARKERS[y[i]], MARKERS[other[i]]
    return x, y.astype(np.int64)


def _block(x, *, approximate: bool):
    import keras
    from keras import layers

    att = layers.MultiHeadAttention(num_heads=2, key_dim=DIM // 2)(x, x)
    x = layers.LayerNormalization(epsilon=1e-6)(x + att)
    h = layers.Dense(2 * DIM)(x)
    h = keras.activations.gelu(h, approximate=approximate)  # an op node: saved without custom code
    return layers.LayerNormalization(epsilon=1e-6)(x + layers.Dense(DIM)(h))


def build_model():
    import keras
    from keras import layers

    tokens = keras.Input(shape=(SEQ,), dtype="int32", name="tokens")
    pos = keras.ops.cumsum(keras.ops.ones_like(tokens), axis=1) - 1  # 0..SEQ-1, in the saved graph
    x = layers.Embedding(VOCAB, DIM)(tokens) + layers.Embedding(SEQ, DIM)(pos)
    x = _block(x, approximate=False)
    x = _block(x, approximate=True)
    x = layers.GlobalAveragePooling1D()(x)
    out = layers.Dense(CLASSES, activation="softmax", name="probs")(x)
    return keras.Model(tokens, out)


def train(out: Path, *, epochs: int = 12, seed: int = 0) -> dict:
    """Train, save model.keras, calibration.npz and a labelled validation.npz; return their paths
    and the Keras model's accuracy on the validation set."""
    import keras

    keras.utils.set_random_seed(seed)
    x, y = token_task(3000, seed=seed)
    xv, yv = token_task(400, seed=seed + 1)
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)
    acc = float(np.mean(np.argmax(model.predict(xv, verbose=0), 1) == yv))
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    np.savez(out / "calibration.npz", tokens=x[:200])
    np.savez(out / "validation.npz", tokens=xv, y=yv)
    return {"model": out / "model.keras", "calibration": out / "calibration.npz",
            "validation": out / "validation.npz", "accuracy": acc}
