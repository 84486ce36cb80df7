"""Encoder -> ONNX and ONNX -> TensorRT, each verified against PyTorch before it is kept."""
