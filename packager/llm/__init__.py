"""Generative decoders (causal LMs): Hugging Face folders and GGUF files to ONNX Runtime GenAI bundles,
chosen per target by measured speed under a generation quality gate."""
