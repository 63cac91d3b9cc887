"""Training data on disk: the three JSONL chat formats loraplex reads and writes."""
