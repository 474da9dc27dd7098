"""evertrain: keep a causal language model training forever on the JSONL files you drop into a folder."""

__version__ = "0.1.0"
