"""Everything that reads or writes ONNX: loading, channel groups, surgery, and the disasm-compile driver."""
