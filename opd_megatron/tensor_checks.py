"""Argument checks shared by the math (losses, credit, routing, gates, diagnostics): each failure is a
`MathInputError` naming the argument, what was expected and what was given."""

from __future__ import annotations

from typing import Iterable

import torch


class MathInputError(ValueError):
    """A tensor or scalar argument of an OPD math function is malformed."""


def require_same_shape(**tensors: torch.Tensor) -> None:
    """All given tensors have one shape, e.g. require_same_shape(student_logits=s, teacher_logits=t)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise MathInputError(f"expected equal shapes, got {listed}")


def require_mask_shape(mask: torch.Tensor, leading: tuple[int, ...], name: str = "mask") -> None:
    if tuple(mask.shape) != tuple(leading):
        raise MathInputError(f"{name}: expected shape {tuple(leading)} (the positions of the logits), "
                             f"got {tuple(mask.shape)}")


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """NaN anywhere, or +inf, is an error; -inf is allowed (a masked logit carries no probability)."""
    if torch.isnan(tensor).any() or torch.isposinf(tensor).any():
        bad = int((torch.isnan(tensor) | torch.isposinf(tensor)).sum())
        raise MathInputError(f"{name}: expected finite values (or -inf for masked entries), found {bad} NaN/+inf")


def require_in_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise MathInputError(f"{name}: expected a value in [{low}, {high}], got {value}")


def require_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise MathInputError(f"{name}: expected one of {choices}, got {value!r}")


def require_positive_int(name: str, value: int, at_most: int | None = None, what: str = "") -> None:
    if not isinstance(value, int) or value < 1 or (at_most is not None and value > at_most):
        bound = f" and at most {at_most}{' (' + what + ')' if what else ''}" if at_most is not None else ""
        raise MathInputError(f"{name}: expected an integer >= 1{bound}, got {value!r}")
