"""Commands around a run: `quickstart.py` (the CPU quickstart), `dry_run.py` (layout and memory without tensors),
`sweep.py` (a grid of run configs x seeds run one after another, resumable, and its report rendered from the
results directory alone)."""
