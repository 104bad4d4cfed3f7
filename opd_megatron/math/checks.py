"""Argument checks shared by the math (losses, credit, routing, gates, diagnostics): each failure is a
`MathInputError` naming the argument, what was expected and what was given."""

from __future__ import annotations

import math
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


def require_positive(name: str, value: float) -> None:
    """A finite scalar > 0 (a temperature, a normalising constant)."""
    if not (float(value) > 0 and math.isfinite(float(value))):
        raise MathInputError(f"{name}: expected a finite value > 0, got {value}")


def require_binary_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """A token mask holds only 0/1 (bool or numeric); returns it as bool."""
    if mask.dtype == torch.bool:
        return mask
    if not ((mask == 0) | (mask == 1)).all():
        raise MathInputError(f"{name}: expected a 0/1 (or bool) token mask, found other values")
    return mask != 0


def require_finite_where(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> None:
    """NaN anywhere is an error; +-inf is an error where `mask` is set (padding may hold -inf log-probs)."""
    nan = torch.isnan(tensor)
    bad = nan | (torch.isinf(tensor) & mask)
    if bad.any():
        raise MathInputError(f"{name}: expected finite values on unmasked positions (and no NaN anywhere), "
                             f"found {int(nan.sum())} NaN and {int((torch.isinf(tensor) & mask).sum())} "
                             f"+-inf on unmasked positions")


def require_floating(name: str, tensor: torch.Tensor) -> None:
    """A floating-point tensor (logits, log-probs, advantages)."""
    if not tensor.is_floating_point():
        raise MathInputError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")


def require_token_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    """An integer tensor of token ids, each in [0, vocab_size)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise MathInputError(f"{name}: expected an integer tensor of token ids, got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise MathInputError(f"{name}: expected token ids in [0, {vocab_size}) (the vocabulary), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
