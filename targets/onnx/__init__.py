"""ONNX target: exact reference graphs and deployable QDQ models."""
