"""The web dashboard of a run: `evertrain dashboard DIR` (see server.py)."""
