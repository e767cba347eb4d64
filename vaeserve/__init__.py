"""vaeserve: train variational autoencoders, export them as ONNX, serve them over gRPC."""

__version__ = "0.2.0"
