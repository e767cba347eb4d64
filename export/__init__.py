"""Export: split a checkpoint into encoder and decoder ONNX graphs, validate them, write a model version."""
