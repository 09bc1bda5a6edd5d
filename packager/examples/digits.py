"""Train a small CNN on scikit-learn's bundled digits (8x8 grayscale, 1797 images) and
write digits.keras plus calibration.npz and validation.npz (with labels) for edgepack.

Real data, a few seconds on a CPU. scikit-learn is needed (pip install scikit-learn).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def train(out: Path, *, epochs: int = 30, seed: int = 0, width: int = 16, start: Path | None = None) -> dict:
    """`start`: a model this function wrote before (same seed, so the same split), trained `epochs` more."""
    import numpy as np
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    keras.utils.set_random_seed(seed)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1) in [0, 1]
    y = digits.target.astype("int64")
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    if start is not None:
        model = keras.models.load_model(start)  # weights and optimizer state: training goes on
    else:
        inp = keras.Input((8, 8, 1), name="image")
        h = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inp)
        h = keras.layers.Conv2D(width * 2, 3, padding="same", activation="relu")(h)
        h = keras.layers.MaxPooling2D()(h)
        h = keras.layers.Flatten()(h)
        h = keras.layers.Dense(64, activation="relu")(h)
        outp = keras.layers.Dense(10, activation="softmax", name="probs")(h)
        model = keras.Model(inp, outp, name="digits_cnn")
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=64, verbose=0)
    _, acc = model.evaluate(x_test, y_test, verbose=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "digits.keras")
    np.savez(out / "calibration.npz", image=x_train[:300])
    np.savez(out / "validation.npz", image=x_test, y=y_test)
    (out / "labels.txt").write_text("\n".join(str(i) for i in range(10)) + "\n")
    return {"model": out / "digits.keras", "test_accuracy": float(acc), "train": len(x_train), "test": len(x_test)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path, nargs="?", default=Path("examples/digits/work"))
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args(argv)
    info = train(args.out, epochs=args.epochs)
    print(f"trained {info['model']}: test accuracy {info['test_accuracy']:.4f} "
          f"({info['train']} train / {info['test']} test images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
