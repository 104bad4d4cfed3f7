"""Synthetic tasks whose answers a program checks: deterministic prompts from a seed, a verifier, a tokenizer.

`get_task(name)` returns a `Task`; see `tasks/base.py` for the interface and `tasks/families.py` for the families.
"""

from opd_megatron.tasks.base import CharTokenizer, Example, Task
from opd_megatron.tasks.families import TASKS, get_task

__all__ = ["CharTokenizer", "Example", "Task", "TASKS", "get_task"]
