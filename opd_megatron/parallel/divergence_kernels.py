"""Per-chunk kernels of the dense divergences' autograd Function (`divergences._Divergence`): for one chunk of
rows, the row statistics a divergence's value and gradient need, and the closed-form gradient itself, each from
the chunk's global log-probabilities `lp = log pi`, `lq = log q` `[chunk, V/tp]` (this rank's real columns) in
preallocated buffers. Every statistic is a sum over the vocabulary, so a rank's statistics are exact partial sums
and one all-reduce SUM of `[k, N]` makes them global.

The gradient. Every divergence here is `F = sum_u phi(pi_u, q_u)` and `d log pi_u / d z_v = (delta_uv - pi_v) /
tau_S`, so with `h_u = d phi / d pi_u`:

    d F / d z_v = pi_v (h_v - H) / tau_S,    H = sum_u pi_u h_u                                    [Ours]

`H` is a row statistic (all-reduced in forward), so backward needs no communication. Per divergence (`P = pi`,
`Q = q`; `F'`-style primes are the statistics as summed, before the constants named below are taken out):

- forward KL `sum q (lq - lp)`: `h = -q / pi`, `H = -1`: gradient `(pi - q) / tau_S`. One statistic.
- reverse KL `sum pi (lp - lq)` (the fused path's; on a logits shard `divergences._ReverseKL` runs):
  `h = lp - lq + 1`, `H = F + 1`: gradient `pi (lp - lq - F) / tau_S`. One statistic.
- total variation `1/2 sum |q - pi|`: `h = -1/2 sign(q - pi)` (0 at `q = pi`, the subgradient torch's `abs`
  takes), `H = -1/2 S`, `S = sum pi sign(q - pi)`: gradient `-1/2 pi (sign(q - pi) - S) / tau_S`.
- generalized JSD, `0 < beta < 1`, `M = beta q + (1 - beta) pi = beta B`, `B = q + r pi`, `r = (1 - beta) /
  beta`: `d/d pi_u [beta q (lq - lm) + (1 - beta) pi (lp - lm)] = (1 - beta)(lp - lm)` (the `1 / M` terms sum
  to `-(1 - beta)` and cancel the `+ (1 - beta)`), so `H = (1 - beta) KL(pi || M)` and the gradient is
  `(1 - beta) pi (lp - lm - KL(pi || M)) / tau_S = (1 - beta) pi (lp - log B - KLp') / tau_S`, with
  `KLp' = sum pi (lp - log B) = KL(pi || M) + log beta` (and `KLq'` likewise; `sum q = sum pi = 1`):
  `JSD = beta KLq' + (1 - beta) KLp' - log beta`.
- skew forward KL `sum q (lq - lm)`, `M = alpha q + (1 - alpha) pi = (1 - alpha) B`, `B = pi + r q`, `r = alpha /
  (1 - alpha)`: `h = -(1 - alpha) q / M = -q / B`, so with `T = q / B` and `W = sum pi T`: gradient
  `pi (W - T) / tau_S`; value `sum q (lq - log B) - log(1 - alpha)`.
- skew reverse KL `sum pi (lp - lm)`, `M = alpha pi + (1 - alpha) q = (1 - alpha) B`, `B = q + r pi`:
  `h = lp - lm + 1 - alpha pi / M`, `H = F + 1 - alpha R`, `R = sum pi^2 / M`; gradient
  `pi (lp - log B - F' - r pi / B + r R') / tau_S` with `F' = sum pi (lp - log B)`, `R' = sum pi^2 / B`; value
  `F' - log(1 - alpha)`.

`0 * log 0 = 0`. An entry whose weight is 0 (a masked token, or exp underflow) meets an infinite or undefined
log-ratio there (`0 * inf`): such entries give NaN in the products, which the hot path does not test element by
element. The Function looks for NaN in the `[N]` statistics, and only for those rows recomputes them with `fix`,
which zeroes the NaN products (their true value is 0 given finite inputs: NaN/+inf logits are the debug checks'
to report), and zeroes the NaN entries of their gradient. As for the reverse KL, an entry whose weight underflows
to 0 while the other side is exactly -inf counts 0 here, where the reference (`_kl_terms`) says +inf.

Cost: each kernel is a handful of in-place or `out=` elementwise passes over `[chunk, V/tp]` into the given
buffers (no allocation of `[chunk, V/tp]` temporaries, whose page faults cost as much as the arithmetic on the
CPU); row dot products are a `mul` into a buffer and a `sum`.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import types
from typing import Callable

import torch

COMPILE_KERNELS_ENV = "OPD_COMPILE_KERNELS"
_compile_kernels = os.environ.get(COMPILE_KERNELS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_compiled_kernels(enabled: bool) -> bool:
    """Run the dense divergences' chunk kernels through `torch.compile` (Inductor: on the CPU, fused C++ loops that
    read each logits chunk a few times and write only the gradient) instead of the eager in-place kernels; returns
    the previous setting. Off by default: the first call of each kernel compiles it (seconds to tens of seconds,
    and a C++ compiler on the CPU). Also `OPD_COMPILE_KERNELS=1` in the environment (read once, at import)."""
    global _compile_kernels
    previous, _compile_kernels = _compile_kernels, bool(enabled)
    return previous


def compiled_kernels_enabled() -> bool:
    return _compile_kernels


def _row_dot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, fix: bool) -> torch.Tensor:
    """`sum_v a_v b_v` `[n]` through `out` (which may be `a` or `b`); with `fix`, NaN products count 0."""
    torch.mul(a, b, out=out)
    if fix:
        out.masked_fill_(torch.isnan(out), 0.0)
    return out.sum(dim=-1)


class DivergenceKernel(abc.ABC):
    """One divergence's chunk kernels. `statistics_of(lp, lq, scratch, fix)` -> `[statistics, n]` row partial
    sums (reads `lp`, `lq`, writes only `scratch`, `forward_buffers` buffers of their shape); `value(stats)` ->
    `[N]` from the all-reduced statistics; `gradient(lp, lq, stats, scale, scratch, out)` writes `d F / d z * g`
    into `out` given `scale = g / tau_S` `[n]` (may overwrite `lp`, `lq`; `backward_buffers` scratch)."""

    statistics = 1
    forward_buffers = 0
    backward_buffers = 0

    @abc.abstractmethod
    def statistics_of(self, lp: torch.Tensor, lq: torch.Tensor, scratch: list[torch.Tensor],
                      fix: bool) -> torch.Tensor: ...

    @abc.abstractmethod
    def statistics_function(self, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        """`statistics_of` as one functional expression `[k, n]` (what `torch.compile` fuses into a few loops)."""

    @abc.abstractmethod
    def gradient_function(self, lp: torch.Tensor, lq: torch.Tensor, stats: torch.Tensor,
                          scale: torch.Tensor) -> torch.Tensor:
        """`gradient` as one functional expression `[n, V/tp]`."""

    def value(self, stats: torch.Tensor) -> torch.Tensor:
        return stats[0]

    @abc.abstractmethod
    def gradient(self, lp: torch.Tensor, lq: torch.Tensor, stats: torch.Tensor, scale: torch.Tensor,
                 scratch: list[torch.Tensor], out: torch.Tensor) -> None: ...


class ForwardKL(DivergenceKernel):
    """`sum q (lq - lp)`; gradient `(pi - q) g / tau_S`."""

    forward_buffers = 2

    def statistics_of(self, lp, lq, scratch, fix):
        q, ratio = scratch
        torch.exp(lq, out=q)
        torch.sub(lq, lp, out=ratio)
        return _row_dot(q, ratio, ratio, fix)[None]

    def gradient(self, lp, lq, stats, scale, scratch, out):
        torch.exp(lp, out=out)
        out.sub_(lq.exp_()).mul_(scale[:, None])

    def statistics_function(self, lp, lq):
        q = lq.exp()
        return (q * (lq - lp)).sum(dim=-1)[None]

    def gradient_function(self, lp, lq, stats, scale):
        return (lp.exp() - lq.exp()) * scale[:, None]


class ReverseKL(DivergenceKernel):
    """`sum pi (lp - lq)`; `h = lp - lq + 1`, `H = F + 1`: gradient `pi (lp - lq - F) g / tau_S`. For the fused
    path (`fused.py`), which has no logits shard to run `divergences._ReverseKL` on; an entry with `pi = 0`
    and `q = 0` is a NaN product there, fixed to 0 as the module docstring says, one with `q = 0 < pi` is +inf."""

    forward_buffers = 2

    def statistics_of(self, lp, lq, scratch, fix):
        p, ratio = scratch
        torch.exp(lp, out=p)
        torch.sub(lp, lq, out=ratio)
        return _row_dot(p, ratio, ratio, fix)[None]

    def gradient(self, lp, lq, stats, scale, scratch, out):
        torch.sub(lp, lq, out=out).sub_(stats[0][:, None]).mul_(lp.exp_()).mul_(scale[:, None])

    def statistics_function(self, lp, lq):
        return (lp.exp() * (lp - lq)).sum(dim=-1)[None]

    def gradient_function(self, lp, lq, stats, scale):
        return lp.exp() * (lp - lq - stats[0][:, None]) * scale[:, None]


class TotalVariation(DivergenceKernel):
    """`1/2 sum |q - pi|`; statistics `[sum |q - pi|, S = sum pi sign(q - pi)]`; gradient
    `-1/2 pi (sign(q - pi) - S) g / tau_S`."""

    statistics = 2
    forward_buffers = 2

    def statistics_of(self, lp, lq, scratch, fix):
        p, diff = scratch
        torch.exp(lp, out=p)
        torch.exp(lq, out=diff).sub_(p)
        l1 = torch.linalg.vector_norm(diff, 1, dim=-1)
        return torch.stack([l1, _row_dot(p, diff.sign_(), diff, fix)])

    def value(self, stats):
        return 0.5 * stats[0]

    def gradient(self, lp, lq, stats, scale, scratch, out):
        p = lp.exp_()
        sign = lq.exp_().sub_(p).sign_().sub_(stats[1][:, None])
        torch.mul(sign, p, out=out).mul_((-0.5 * scale)[:, None])

    def statistics_function(self, lp, lq):
        p = lp.exp()
        diff = lq.exp() - p
        return torch.stack([diff.abs().sum(dim=-1), (p * diff.sign()).sum(dim=-1)])

    def gradient_function(self, lp, lq, stats, scale):
        p = lp.exp()
        return (lq.exp() - p).sign().sub(stats[1][:, None]) * p * (-0.5 * scale)[:, None]


class GeneralizedJSD(DivergenceKernel):
    """`beta KL(q || M) + (1 - beta) KL(pi || M)`, `0 < beta < 1` (the endpoints are the plain KLs, which the
    caller dispatches); statistics `[KLq', KLp']` (module docstring)."""

    statistics = 2
    forward_buffers = 4
    backward_buffers = 1

    def __init__(self, beta: float) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"GeneralizedJSD: beta must lie strictly inside (0, 1), got {beta}")
        self.beta, self.ratio = beta, (1.0 - beta) / beta

    def statistics_of(self, lp, lq, scratch, fix):
        p, q, log_b, diff = scratch
        torch.exp(lp, out=p)
        torch.exp(lq, out=q)
        torch.add(q, p, alpha=self.ratio, out=log_b).log_()
        kl_q = _row_dot(q, torch.sub(lq, log_b, out=diff), diff, fix)
        kl_p = _row_dot(p, torch.sub(lp, log_b, out=diff), diff, fix)
        return torch.stack([kl_q, kl_p])

    def value(self, stats):
        return self.beta * stats[0] + (1.0 - self.beta) * stats[1] - math.log(self.beta)

    def gradient(self, lp, lq, stats, scale, scratch, out):
        p = torch.exp(lp, out=scratch[0])
        log_b = lq.exp_().add_(p, alpha=self.ratio).log_()
        lp.sub_(log_b).sub_(stats[1][:, None])
        torch.mul(lp, p, out=out).mul_(((1.0 - self.beta) * scale)[:, None])

    def statistics_function(self, lp, lq):
        p, q = lp.exp(), lq.exp()
        log_b = (q + self.ratio * p).log()
        return torch.stack([(q * (lq - log_b)).sum(dim=-1), (p * (lp - log_b)).sum(dim=-1)])

    def gradient_function(self, lp, lq, stats, scale):
        p = lp.exp()
        log_b = (lq.exp() + self.ratio * p).log()
        return p * (lp - log_b - stats[1][:, None]) * ((1.0 - self.beta) * scale)[:, None]


class SkewForwardKL(DivergenceKernel):
    """`KL(q || alpha q + (1 - alpha) pi)`, `0 < alpha < 1`; statistics `[sum q (lq - log B), W]`."""

    statistics = 2
    forward_buffers = 4
    backward_buffers = 2

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"SkewForwardKL: alpha must lie strictly inside (0, 1), got {alpha}")
        self.alpha, self.ratio = alpha, alpha / (1.0 - alpha)

    def statistics_of(self, lp, lq, scratch, fix):
        p, q, b, work = scratch
        torch.exp(lp, out=p)
        torch.exp(lq, out=q)
        torch.add(p, q, alpha=self.ratio, out=b)
        w = _row_dot(p, torch.div(q, b, out=work), work, fix)
        kl = _row_dot(q, torch.sub(lq, b.log_(), out=work), work, fix)
        return torch.stack([kl, w])

    def value(self, stats):
        return stats[0] - math.log1p(-self.alpha)

    def gradient(self, lp, lq, stats, scale, scratch, out):
        p = torch.exp(lp, out=scratch[0])
        q = lq.exp_()
        t = q.div_(torch.add(p, q, alpha=self.ratio, out=scratch[1]))
        torch.sub(stats[1][:, None], t, out=out).mul_(p).mul_(scale[:, None])

    def statistics_function(self, lp, lq):
        p, q = lp.exp(), lq.exp()
        b = p + self.ratio * q
        return torch.stack([(q * (lq - b.log())).sum(dim=-1), (p * q / b).sum(dim=-1)])

    def gradient_function(self, lp, lq, stats, scale):
        p, q = lp.exp(), lq.exp()
        return p * (stats[1][:, None] - q / (p + self.ratio * q)) * scale[:, None]


class SkewReverseKL(DivergenceKernel):
    """`KL(pi || alpha pi + (1 - alpha) q)`, `0 < alpha < 1`; statistics `[F', R']` (module docstring)."""

    statistics = 2
    forward_buffers = 3
    backward_buffers = 2

    def __init__(self, alpha: float) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"SkewReverseKL: alpha must lie strictly inside (0, 1), got {alpha}")
        self.alpha, self.ratio = alpha, alpha / (1.0 - alpha)

    def statistics_of(self, lp, lq, scratch, fix):
        p, b, work = scratch
        torch.exp(lp, out=p)
        torch.exp(lq, out=b).add_(p, alpha=self.ratio)
        r = _row_dot(p, torch.div(p, b, out=work), work, fix)
        f = _row_dot(p, torch.sub(lp, b.log_(), out=work), work, fix)
        return torch.stack([f, r])

    def value(self, stats):
        return stats[0] - math.log1p(-self.alpha)

    def gradient(self, lp, lq, stats, scale, scratch, out):
        p = torch.exp(lp, out=scratch[0])
        b = lq.exp_().add_(p, alpha=self.ratio)
        t = torch.div(p, b, out=scratch[1])
        lp.sub_(b.log_()).sub_(t, alpha=self.ratio).add_((self.ratio * stats[1] - stats[0])[:, None])
        torch.mul(lp, p, out=out).mul_(scale[:, None])

    def statistics_function(self, lp, lq):
        p = lp.exp()
        b = lq.exp() + self.ratio * p
        return torch.stack([(p * (lp - b.log())).sum(dim=-1), (p * p / b).sum(dim=-1)])

    def gradient_function(self, lp, lq, stats, scale):
        p = lp.exp()
        b = lq.exp() + self.ratio * p
        shift = (self.ratio * stats[1] - stats[0])[:, None]
        return p * (lp - b.log() - self.ratio * p / b + shift) * scale[:, None]


class Zero(DivergenceKernel):
    """The skew KLs at `alpha = 1` (the mixture is the weighting side itself): 0, gradient 0."""

    def statistics_of(self, lp, lq, scratch, fix):
        return lp.new_zeros(1, lp.shape[0])

    def gradient(self, lp, lq, stats, scale, scratch, out):
        out.zero_()

    def statistics_function(self, lp, lq):
        return lp.new_zeros(1, lp.shape[0])

    def gradient_function(self, lp, lq, stats, scale):
        return torch.zeros_like(lp)


# ---------------------------------------------------------------------------------------------------------------
# The compiled path: the same statistics and gradient from the logits chunk, as functions `torch.compile` fuses


def local_normalizers(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float,
                      teacher_temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """`logsumexp(z / tau)` of both sides over the given columns `[2, n]` (-inf for a row without mass)."""
    return torch.stack([torch.logsumexp(student.to(dtype) / student_temperature, dim=-1),
                        torch.logsumexp(teacher.to(dtype) / teacher_temperature, dim=-1)])


def statistics_from_logits(kernel: DivergenceKernel, student: torch.Tensor, teacher: torch.Tensor,
                           lse: torch.Tensor, student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """The kernel's statistics `[k, n]` from the logits chunk and the global normalisers `lse [2, n]`."""
    lp = student.to(lse.dtype) / student_temperature - lse[0][:, None]
    lq = teacher.to(lse.dtype) / teacher_temperature - lse[1][:, None]
    return kernel.statistics_function(lp, lq)


def gradient_from_logits(kernel: DivergenceKernel, student: torch.Tensor, teacher: torch.Tensor, lse: torch.Tensor,
                         stats: torch.Tensor, scale: torch.Tensor, student_temperature: float,
                         teacher_temperature: float) -> torch.Tensor:
    """The kernel's gradient `[n, V/tp]` (in the statistics' dtype) from the logits chunk."""
    lp = student.to(lse.dtype) / student_temperature - lse[0][:, None]
    lq = teacher.to(lse.dtype) / teacher_temperature - lse[1][:, None]
    return kernel.gradient_function(lp, lq, stats, scale)


@functools.cache
def compiled(function: Callable, kernel: DivergenceKernel, dtype: torch.dtype) -> Callable:
    """`torch.compile(function, dynamic=True)` for one kernel and dtype. Dynamo keeps its compiled graphs per code
    object and falls back to eager past `recompile_limit` (8) of them, which a process that runs several
    divergences and dtypes reaches; a copy of the code object per (kernel, dtype) gives each its own cache. Dynamic
    shapes: the last, shorter chunk reuses the graph."""
    code = function.__code__.replace()
    copy = types.FunctionType(code, function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    return torch.compile(copy, dynamic=True)
