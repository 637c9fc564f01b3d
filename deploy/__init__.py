"""ONNX export, TensorRT and ONNX Runtime engines, latency benchmarks and the KPI gate."""
