"""bge-onnx's benchmarks: run one with `python -m benchmarks NAME [options]`; `python -m benchmarks` lists them."""
