"""Triton kernels of the dense divergences' chunk math (`divergence_kernels.py`), for CUDA tensors: the same three
phases as its compiled path (`local_normalizers`, `statistics_from_logits`, `gradient_from_logits`, same names,
arguments and results), each one kernel that reads each logits shard once and writes only `[2, n]`, `[k, n]` or
the gradient, with no `[chunk, V/tp]` temporaries. The all-reduces stay the caller's (`divergences._Divergence`),
at the same points as the torch path:

    local_normalizers      [2, n]   one read of z, t (online softmax over vocabulary blocks [Milakov & Gimelshein,
                                    "Online normalizer calculation for softmax", 2018])
    -> all-reduce MAX, SUM (tp > 1) -> global normalisers lse [2, n]
    statistics_from_logits [k, n]   one read of z, t (lp = z / tau_S - lse_S, lq likewise; the kernel's row sums)
    -> all-reduce SUM               -> statistics [k, n]
    gradient_from_logits   [n, V/tp] one read of z, t, one write of the gradient (closed form, no communication)

The statistics need the global normalisers (the mixtures' `log(q + r pi)` and total variation's `sign(q - pi)`
do not factor through a per-block rescaling), so forward reads each chunk twice, as the torch path does (its
log_softmax, then the statistics' passes); backward reads it once.

The formulas are `divergence_kernels.py`'s (derived in its docstring; `kind` codes below), with its `fix` built
in: a product whose weight is 0 (`q` for `q (lq - .)`, `pi` for `pi (.)`) counts 0, also where its other factor
is infinite or undefined (`0 * inf`, `-inf - -inf`), so the statistics are never NaN for finite or -inf logits
and no row needs a second pass. A -inf logit (a masked token, a padded column the caller did not slice off) has
log-probability -inf exactly, whatever the normaliser.

Compute dtype: float32 for half / bfloat16 / float32 inputs, float64 for float64 (`math.divergences.
compute_dtype`); temperatures and mixture ratios enter as float64 scalars, cast to the compute dtype in the
kernel (as torch casts a Python scalar). On CPU tensors the kernels run under Triton's interpreter, which needs
`TRITON_INTERPRET=1` in the environment before `triton` is first imported (numpy, slow: for tests only);
`use_triton` selects the compiled kernels for CUDA tensors.
"""

import os
from typing import Optional

import torch

from opd_megatron.parallel.divergence_kernels import (DivergenceKernel, ForwardKL, GeneralizedJSD, ReverseKL,
                                                      SkewForwardKL, SkewReverseKL, TotalVariation, Zero)

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch kernels serve, `use_triton` says False
    triton = None

DISABLE_TRITON_ENV = "OPD_DISABLE_TRITON"
COMPUTE_DTYPES = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Kernel codes (constexpr: each is its own compiled kernel) and the statistics each sums.
FORWARD_KL = 0        # [sum q (lq - lp)]
TOTAL_VARIATION = 1   # [sum |q - pi|, S = sum pi sign(q - pi)]
GENERALIZED_JSD = 2   # [KLq' = sum q (lq - log B), KLp' = sum pi (lp - log B)], B = q + r pi, r = (1 - beta) / beta
SKEW_FORWARD_KL = 3   # [sum q (lq - log B), W = sum pi q / B], B = pi + r q, r = alpha / (1 - alpha)
SKEW_REVERSE_KL = 4   # [F' = sum pi (lp - log B), R' = sum pi^2 / B], B = q + r pi, r = alpha / (1 - alpha)
REVERSE_KL = 5        # [sum pi (lp - lq)]

# Columns per block. The row kernels loop over a row in blocks; backward gives each block its own program.
ROW_BLOCK = 4096
GRADIENT_BLOCK = 2048


def triton_available() -> bool:
    return triton is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether `divergences._Divergence` runs these kernels for `tensor` (the student's logits shard): a CUDA
    tensor of a float dtype, `triton` importable, and `OPD_DISABLE_TRITON` not set to 1 / true (read at each call,
    so a test or a debugging session can switch back to the torch kernels without reloading)."""
    if triton is None or not tensor.is_cuda or tensor.dtype not in INPUT_DTYPES:
        return False
    return os.environ.get(DISABLE_TRITON_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def kernel_code(kernel: DivergenceKernel) -> tuple[int, float, float]:
    """`(kind code, mixture ratio r, gradient coefficient)` of a chunk kernel of `divergence_kernels.py`: the
    coefficient is JSD's `1 - beta` (1 for the others). `Zero` has no Triton kernel (the callers below return
    zeros without a launch)."""
    if isinstance(kernel, ForwardKL):
        return FORWARD_KL, 0.0, 1.0
    if isinstance(kernel, TotalVariation):
        return TOTAL_VARIATION, 0.0, 1.0
    if isinstance(kernel, GeneralizedJSD):
        return GENERALIZED_JSD, kernel.ratio, 1.0 - kernel.beta
    if isinstance(kernel, SkewForwardKL):
        return SKEW_FORWARD_KL, kernel.ratio, 1.0
    if isinstance(kernel, SkewReverseKL):
        return SKEW_REVERSE_KL, kernel.ratio, 1.0
    if isinstance(kernel, ReverseKL):
        return REVERSE_KL, 0.0, 1.0
    raise TypeError(f"triton_divergences: no Triton kernel for {type(kernel).__name__}; expected one of ForwardKL, "
                    f"ReverseKL, TotalVariation, GeneralizedJSD, SkewForwardKL, SkewReverseKL or Zero "
                    f"(divergence_kernels.py)")


if triton is not None:

    @triton.jit
    def _normalizers_kernel(student_ptr, teacher_ptr, out_ptr, n_cols, student_stride, teacher_stride,
                            out_stride, student_temperature: tl.float64, teacher_temperature: tl.float64,
                            COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: `logsumexp(z / tau_S)`, `logsumexp(t / tau_T)` over the row's `n_cols` columns
        into `out[0, row]`, `out[1, row]` (-inf for a row that is all -inf), by the online softmax: a running
        maximum `m` and the sum of `exp(x - m)`, rescaled by `exp(m_old - m_new)` when the maximum grows."""
        row = tl.program_id(0).to(tl.int64)
        tau_s = tl.full((), student_temperature, COMPUTE)
        tau_t = tl.full((), teacher_temperature, COMPUTE)
        student_row = student_ptr + row * student_stride
        teacher_row = teacher_ptr + row * teacher_stride
        max_s = tl.full((), float("-inf"), COMPUTE)
        max_t = tl.full((), float("-inf"), COMPUTE)
        sum_s = tl.zeros((), COMPUTE)
        sum_t = tl.zeros((), COMPUTE)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            x = tl.load(student_row + cols, mask=inside, other=float("-inf")).to(COMPUTE) / tau_s
            y = tl.load(teacher_row + cols, mask=inside, other=float("-inf")).to(COMPUTE) / tau_t
            new_s = tl.maximum(max_s, tl.max(x, axis=0))
            new_t = tl.maximum(max_t, tl.max(y, axis=0))
            # While every column so far is -inf the maximum is -inf: shift by 0 there (exp(-inf - -inf) is NaN).
            shift_s = tl.where(new_s == float("-inf"), 0.0, new_s)
            shift_t = tl.where(new_t == float("-inf"), 0.0, new_t)
            sum_s = sum_s * tl.exp(max_s - shift_s) + tl.sum(tl.exp(x - shift_s), axis=0)
            sum_t = sum_t * tl.exp(max_t - shift_t) + tl.sum(tl.exp(y - shift_t), axis=0)
            max_s = new_s
            max_t = new_t
        lse_s = tl.where(max_s == float("-inf"), float("-inf"), max_s + tl.log(sum_s))
        lse_t = tl.where(max_t == float("-inf"), float("-inf"), max_t + tl.log(sum_t))
        tl.store(out_ptr + row, lse_s)
        tl.store(out_ptr + out_stride + row, lse_t)

    @triton.jit
    def _statistics_kernel(student_ptr, teacher_ptr, lse_ptr, out_ptr, n_cols, student_stride, teacher_stride,
                           lse_stride, out_stride, student_temperature: tl.float64, teacher_temperature: tl.float64,
                           ratio: tl.float64, KIND: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
        """One program per row: the kernel's row statistics (`KIND`, module constants) of the global log-probs
        `lp = z / tau_S - lse[0]`, `lq = t / tau_T - lse[1]` over the row's `n_cols` columns into `out[:, row]`.
        Per-lane accumulators `[BLOCK]`, summed once at the end."""
        row = tl.program_id(0).to(tl.int64)
        tau_s = tl.full((), student_temperature, COMPUTE)
        tau_t = tl.full((), teacher_temperature, COMPUTE)
        r = tl.full((), ratio, COMPUTE)
        lse_s = tl.load(lse_ptr + row).to(COMPUTE)
        lse_t = tl.load(lse_ptr + lse_stride + row).to(COMPUTE)
        student_row = student_ptr + row * student_stride
        teacher_row = teacher_ptr + row * teacher_stride
        first = tl.zeros((BLOCK,), COMPUTE)
        second = tl.zeros((BLOCK,), COMPUTE)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < n_cols
            z = tl.load(student_row + cols, mask=inside, other=float("-inf")).to(COMPUTE)
            t = tl.load(teacher_row + cols, mask=inside, other=float("-inf")).to(COMPUTE)
            lp = tl.where(z == float("-inf"), float("-inf"), z / tau_s - lse_s)
            lq = tl.where(t == float("-inf"), float("-inf"), t / tau_t - lse_t)
            p = tl.exp(lp)
            q = tl.exp(lq)
            if KIND == 0:  # FORWARD_KL
                first += tl.where(q == 0.0, 0.0, q * (lq - lp))
            elif KIND == 1:  # TOTAL_VARIATION
                diff = q - p
                first += tl.abs(diff)
                second += tl.where(diff > 0.0, p, tl.where(diff < 0.0, -p, 0.0))
            elif KIND == 2:  # GENERALIZED_JSD
                log_b = tl.log(q + r * p)
                first += tl.where(q == 0.0, 0.0, q * (lq - log_b))
                second += tl.where(p == 0.0, 0.0, p * (lp - log_b))
            elif KIND == 3:  # SKEW_FORWARD_KL
                b = p + r * q
                first += tl.where(q == 0.0, 0.0, q * (lq - tl.log(b)))
                second += tl.where(p == 0.0, 0.0, p * (q / b))
            elif KIND == 4:  # SKEW_REVERSE_KL
                b = q + r * p
                first += tl.where(p == 0.0, 0.0, p * (lp - tl.log(b)))
                second += tl.where(p == 0.0, 0.0, p * (p / b))
            else:  # REVERSE_KL
                first += tl.where(p == 0.0, 0.0, p * (lp - lq))
        tl.store(out_ptr + row, tl.sum(first, axis=0))
        if KIND != 0 and KIND != 5:
            tl.store(out_ptr + out_stride + row, tl.sum(second, axis=0))

    @triton.jit
    def _gradient_kernel(student_ptr, teacher_ptr, lse_ptr, stats_ptr, scale_ptr, out_ptr, n_cols, student_stride,
                         teacher_stride, lse_stride, stats_stride, out_stride, student_temperature: tl.float64,
                         teacher_temperature: tl.float64, ratio: tl.float64, coefficient: tl.float64,
                         KIND: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, block): `d F / d z * g` on the block's columns into `out` (cast to its dtype), with
        `scale = g / tau_S` `[n]` and the all-reduced statistics (`divergence_kernels.py`'s closed forms: `pi (h -
        H) scale`). An entry with `pi = 0` gets 0."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < n_cols
        tau_s = tl.full((), student_temperature, COMPUTE)
        tau_t = tl.full((), teacher_temperature, COMPUTE)
        r = tl.full((), ratio, COMPUTE)
        lse_s = tl.load(lse_ptr + row).to(COMPUTE)
        lse_t = tl.load(lse_ptr + lse_stride + row).to(COMPUTE)
        scale = tl.load(scale_ptr + row).to(COMPUTE)
        z = tl.load(student_ptr + row * student_stride + cols, mask=inside, other=float("-inf")).to(COMPUTE)
        t = tl.load(teacher_ptr + row * teacher_stride + cols, mask=inside, other=float("-inf")).to(COMPUTE)
        lp = tl.where(z == float("-inf"), float("-inf"), z / tau_s - lse_s)
        lq = tl.where(t == float("-inf"), float("-inf"), t / tau_t - lse_t)
        p = tl.exp(lp)
        q = tl.exp(lq)
        if KIND == 0:  # FORWARD_KL: (pi - q) scale
            grad = (p - q) * scale
        elif KIND == 1:  # TOTAL_VARIATION: -1/2 pi (sign(q - pi) - S) scale
            total = tl.load(stats_ptr + stats_stride + row).to(COMPUTE)
            diff = q - p
            sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
            grad = -0.5 * scale * p * (sign - total)
        elif KIND == 2:  # GENERALIZED_JSD: (1 - beta) pi (lp - log B - KLp') scale
            kl_p = tl.load(stats_ptr + stats_stride + row).to(COMPUTE)
            weight = tl.full((), coefficient, COMPUTE) * scale
            grad = tl.where(p == 0.0, 0.0, p * (lp - tl.log(q + r * p) - kl_p) * weight)
        elif KIND == 3:  # SKEW_FORWARD_KL: pi (W - q / B) scale
            w = tl.load(stats_ptr + stats_stride + row).to(COMPUTE)
            grad = tl.where(p == 0.0, 0.0, p * (w - q / (p + r * q)) * scale)
        elif KIND == 4:  # SKEW_REVERSE_KL: pi (lp - log B - r pi / B + r R' - F') scale
            f = tl.load(stats_ptr + row).to(COMPUTE)
            squares = tl.load(stats_ptr + stats_stride + row).to(COMPUTE)
            b = q + r * p
            grad = tl.where(p == 0.0, 0.0, p * (lp - tl.log(b) - r * p / b + (r * squares - f)) * scale)
        else:  # REVERSE_KL: pi (lp - lq - F) scale
            f = tl.load(stats_ptr + row).to(COMPUTE)
            grad = tl.where(p == 0.0, 0.0, p * (lp - lq - f) * scale)
        tl.store(out_ptr + row * out_stride + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _tl_dtype(dtype: torch.dtype):
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"triton_divergences: compute dtype must be float32 or float64, got {dtype}")
    return tl.float32 if dtype == torch.float32 else tl.float64


def _row_block(n_cols: int, block_size: Optional[int]) -> int:
    return block_size or min(ROW_BLOCK, triton.next_power_of_2(max(n_cols, 1)))


def _unit_stride(name: str, tensor: torch.Tensor, rows: int, width: Optional[int] = None) -> torch.Tensor:
    """`tensor` `[rows, width]` (2-D, columns contiguous: a column slice of a wider shard is fine)."""
    if tensor.dim() != 2 or tensor.shape[0] != rows or (width is not None and tensor.shape[1] != width):
        expected = f"[{rows}, {'V/tp' if width is None else width}]"
        raise ValueError(f"triton_divergences: {name} must have shape {expected}, got {list(tensor.shape)}")
    return tensor if tensor.stride(1) == 1 or tensor.shape[1] <= 1 else tensor.contiguous()


def _require_triton(student: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("triton_divergences: triton is not importable (pip install triton); use the torch "
                           "kernels of divergence_kernels.py")
    if not student.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"triton_divergences: the kernels run on CUDA tensors, got a {student.device.type} tensor "
                         f"(CPU tensors only under Triton's interpreter: TRITON_INTERPRET=1 set before triton is "
                         f"imported)")


def local_normalizers(student: torch.Tensor, teacher: torch.Tensor, student_temperature: float,
                      teacher_temperature: float, dtype: torch.dtype, *,
                      block_size: Optional[int] = None) -> torch.Tensor:
    """`logsumexp(z / tau)` of both sides over the given columns `[2, n]` in `dtype` (-inf for a row without mass),
    from logits `[n, w]` (this rank's real columns: a column slice of the shard is read in place). One read of
    each. `block_size` (a power of 2) overrides the columns per step (tests)."""
    _require_triton(student)
    rows, width = student.shape[0], student.shape[-1]
    student = _unit_stride("student", student, rows)
    teacher = _unit_stride("teacher", teacher, rows, width)
    out = torch.empty(2, rows, dtype=dtype, device=student.device)
    if rows > 0:
        _normalizers_kernel[(rows,)](student, teacher, out, width, student.stride(0), teacher.stride(0),
                                     out.stride(0), float(student_temperature), float(teacher_temperature),
                                     COMPUTE=_tl_dtype(dtype), BLOCK=_row_block(width, block_size))
    return out


def statistics_from_logits(kernel: DivergenceKernel, student: torch.Tensor, teacher: torch.Tensor,
                           lse: torch.Tensor, student_temperature: float, teacher_temperature: float, *,
                           block_size: Optional[int] = None) -> torch.Tensor:
    """The kernel's row statistics `[kernel.statistics, n]` (this rank's partial sums; one all-reduce SUM makes
    them global) from the logits `[n, w]` and the global normalisers `lse [2, n]`, in `lse.dtype`. One read of
    each side."""
    _require_triton(student)
    rows, width = student.shape[0], student.shape[-1]
    if isinstance(kernel, Zero):
        return lse.new_zeros(kernel.statistics, rows)
    code, ratio, _ = kernel_code(kernel)
    student = _unit_stride("student", student, rows)
    teacher = _unit_stride("teacher", teacher, rows, width)
    lse = _unit_stride("lse", lse, 2, rows)
    out = torch.zeros(kernel.statistics, rows, dtype=lse.dtype, device=student.device)
    if rows > 0 and width > 0:
        _statistics_kernel[(rows,)](student, teacher, lse, out, width, student.stride(0), teacher.stride(0),
                                    lse.stride(0), out.stride(0), float(student_temperature),
                                    float(teacher_temperature), float(ratio), KIND=code,
                                    COMPUTE=_tl_dtype(lse.dtype), BLOCK=_row_block(width, block_size))
    return out


def gradient_from_logits(kernel: DivergenceKernel, student: torch.Tensor, teacher: torch.Tensor, lse: torch.Tensor,
                         stats: torch.Tensor, scale: torch.Tensor, student_temperature: float,
                         teacher_temperature: float, *, out: Optional[torch.Tensor] = None,
                         block_size: Optional[int] = None) -> torch.Tensor:
    """The kernel's gradient `d F / d z * g` `[n, w]` from the logits `[n, w]`, the global normalisers `lse
    [2, n]`, the all-reduced statistics `[k, n]` and `scale = g / tau_S` `[n]`. Written into `out` (any float
    dtype, e.g. a column slice of the student's gradient buffer: the kernel casts), else into a new tensor of
    `lse.dtype`. One read of each side, one write; no communication."""
    _require_triton(student)
    rows, width = student.shape[0], student.shape[-1]
    if out is None:
        out = torch.empty(rows, width, dtype=lse.dtype, device=student.device)
    elif tuple(out.shape) != (rows, width) or (width > 1 and out.stride(1) != 1):
        raise ValueError(f"triton_divergences: out must be [{rows}, {width}] with contiguous columns, got "
                         f"{list(out.shape)} with strides {list(out.stride())}")
    if isinstance(kernel, Zero):
        return out.zero_()
    code, ratio, coefficient = kernel_code(kernel)
    student = _unit_stride("student", student, rows)
    teacher = _unit_stride("teacher", teacher, rows, width)
    lse = _unit_stride("lse", lse, 2, rows)
    stats = _unit_stride("stats", stats, kernel.statistics, rows)
    scale = scale.contiguous()
    if scale.shape != (rows,):
        raise ValueError(f"triton_divergences: scale must have shape [{rows}], got {list(scale.shape)}")
    if rows > 0 and width > 0:
        block = block_size or min(GRADIENT_BLOCK, triton.next_power_of_2(width))
        _gradient_kernel[(rows, triton.cdiv(width, block))](
            student, teacher, lse, stats, scale, out, width, student.stride(0), teacher.stride(0), lse.stride(0),
            stats.stride(0), out.stride(0), float(student_temperature), float(teacher_temperature), float(ratio),
            float(coefficient), KIND=code, COMPUTE=_tl_dtype(lse.dtype), BLOCK=block)
    return out
