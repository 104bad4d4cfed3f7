"""Performance benchmarks (run as modules, e.g. `python -m benchmarks.student_step`); see benchmarks/README.md."""
