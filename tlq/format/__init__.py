"""The packed checkpoint format: bit packing, writer, reader, reference dequantizer."""
