"""r1box export stage: model sources, ONNX conversion with a KV cache, int4 quantization, manifest and parity."""
