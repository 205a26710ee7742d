"""Data: the prepared-dataset format, the in-silico NSD generator, the input pipeline."""
