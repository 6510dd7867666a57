"""Everything that runs the network in PyTorch: the ONNX interpreter, Disassembler scores, selection."""
