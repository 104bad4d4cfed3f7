"""Commands around a run: `quickstart.py` (the CPU quickstart), `dry_run.py` (layout and memory without tensors)."""
