"""Export of omni-rt modules to ONNX / TensorRT engines (the export issue builds this out)."""
