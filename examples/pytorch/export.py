"""PyTorch -> ONNX -> a Raspberry Pi bundle: the export step (needs torch and torchvision, which
edgepack itself does not; CI starts from the ONNX file instead, see tests/test_onnx_tflite.py).

    pip install torch torchvision onnx onnxscript pillow scikit-learn   # CPU wheels are enough
    python examples/pytorch/export.py examples/pytorch/work [--images DIR] [--no-pretrained]

Writes into the work folder:
    mobilenet_v3_small.onnx   torchvision's MobileNetV3-Small, input `image` (batch, 3, 224, 224), output `logits`
    calibration.npz           100 images, preprocessed exactly as the model expects (the app must do the same)
    validation.npz            50 other images, to check the bundle against the ONNX model

Then (README.md in this folder): edgepack build work/mobilenet_v3_small.onnx -t rpi5 ...
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # torchvision's ImageNet normalisation
STD = np.array([0.229, 0.224, 0.225], np.float32)


def export(out: Path, *, pretrained: bool, data: np.ndarray) -> Path:
    import torch
    import torchvision

    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT if pretrained else None
    model = torchvision.models.mobilenet_v3_small(weights=weights)
    if not pretrained:
        # Random weights with default BatchNorm statistics shrink the signal layer by layer (logits
        # ~1e-9): nothing a quantizer can represent. Estimating the statistics on the images gives
        # an untrained but well-scaled network, enough to try the flow without a download.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(0, len(data), 25):
                model(torch.from_numpy(data[i:i + 25]))
    model.eval()
    path = out / "mobilenet_v3_small.onnx"
    # A named input and output, a dynamic batch axis, and an opset onnx2tf and ONNX Runtime both know
    # (torch.export-based exporter, the default since PyTorch 2.9; it needs onnxscript).
    # The layout stays NCHW: the edgepack bundle takes NCHW too (the NHWC transposes live inside).
    torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=18, external_data=False)  # one file (weights inside; < 2 GB)
    return path


def images(folder: Path | None, n: int) -> np.ndarray:
    """n RGB images, 224x224 (uint8): from a folder of your own photos, or crops of the two
    photographs scikit-learn ships (fine to try the flow; calibrate on your own data for real use)."""
    from PIL import Image

    if folder:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        return np.stack([np.asarray(Image.open(p).convert("RGB").resize((224, 224))) for p in files])
    from sklearn.datasets import load_sample_images

    rng, photos, out = np.random.default_rng(0), load_sample_images().images, []
    for i in range(n):
        img = photos[i % len(photos)]
        s = rng.uniform(0.3, 1.0)
        h, w = int(img.shape[0] * s), int(img.shape[1] * s)
        y, x = rng.integers(0, img.shape[0] - h + 1), rng.integers(0, img.shape[1] - w + 1)
        out.append(np.asarray(Image.fromarray(img[y:y + h, x:x + w]).resize((224, 224))))
    return np.stack(out)


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 (N, 224, 224, 3) -> float32 (N, 3, 224, 224), normalised as torchvision does."""
    return ((rgb.astype(np.float32) / 255.0 - MEAN) / STD).transpose(0, 3, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=Path, help="a folder of your own .jpg/.png images (150 or more)")
    ap.add_argument("--no-pretrained", action="store_true",
                    help="random weights (no download), BatchNorm statistics estimated on the calibration images")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    x = preprocess(images(args.images, 150))
    path = export(args.out, pretrained=not args.no_pretrained, data=x[:100])
    np.savez(args.out / "calibration.npz", image=x[:100])
    np.savez(args.out / "validation.npz", image=x[100:])
    print(f"wrote {path}, calibration.npz ({len(x[:100])} images), validation.npz ({len(x[100:])} images)")


if __name__ == "__main__":
    main()
