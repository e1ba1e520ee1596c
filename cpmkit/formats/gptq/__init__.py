"""GPTQ bytes: AutoGPTQ's qweight/qzeros bit packing and compressed-tensors' pack-quantized rows (``pack``), the
``quantization_config`` each writes and readers accept (``config``)."""
