"""Dataset shapes -> one normalized Record per example (see CONTRACT, to be implemented)."""
