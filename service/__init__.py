"""The gRPC inference service on ONNX Runtime: sessions, dynamic batching, servicer, metrics, client."""
