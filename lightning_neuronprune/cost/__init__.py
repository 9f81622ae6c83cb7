"""What an inference costs: per-layer counting rules and the 45 nm energy and memory model."""
