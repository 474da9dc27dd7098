"""evertrain: keep a causal language model training forever on the data files you drop into a folder."""

__version__ = "0.1.0"
