"""The Triton kernels of the dense divergences (`parallel/triton_divergences.py`) equal the torch chunk kernels
(`parallel/divergence_kernels.py`, which `test_divergences.py` holds equal to `math/divergences.py`): normalisers,
row statistics and gradient, float32 and float64, on rows with -inf columns (masked tokens on either side or
both, padded vocabulary columns, a shard without mass), at TP = 1 (the whole row) and at TP = 3 (three column
shards whose statistics are combined as the all-reduces combine them), with widths that are not a multiple of
the block; the values also equal the references'.

Triton is not in the project's environment (megatron-core would import it in every process of the suite): on the
CPU the checks run in one child process, `<python> -m tests.parallel.test_triton_divergences` with TRITON_INTERPRET=1
(the interpreter takes effect only when set before `triton` is first imported), where `<python>` is the Triton venv's
(`triton_env.py`: built once, cached; CI builds it before pytest) or, where the project environment has triton (a GPU
machine's CUDA torch), this interpreter. The child runs the interpreter checks, then compiles every kernel for sm_90
without a GPU; the pytest process never imports triton. About 25 s on 2 loaded cores, most of it the child's imports.
On a GPU (`gpu` tests) the compiled kernels, and the divergences with and without them (`OPD_DISABLE_TRITON=1`), are
compared on CUDA tensors, bfloat16 gradients included (Triton 3.9's interpreter truncates float32 -> bfloat16 where
the compiled kernels round to nearest even, so the interpreter checks write float32 only)."""

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Iterator, Optional

import pytest
import torch

from opd_megatron.math.divergences import divergence_from_log_probs
from opd_megatron.parallel import divergence_kernels as torch_kernels
from opd_megatron.parallel import triton_divergences as td
from tests.parallel import triton_env

REPOSITORY = Path(__file__).resolve().parents[2]
TAUS = (0.7, 1.3)
# (name, the torch kernel, kind and parameters of the reference)
CASES = [
    ("forward_kl", torch_kernels.ForwardKL(), "forward_kl", {}),
    ("reverse_kl", torch_kernels.ReverseKL(), "reverse_kl", {}),
    ("total_variation", torch_kernels.TotalVariation(), "total_variation", {}),
    ("generalized_jsd", torch_kernels.GeneralizedJSD(0.3), "generalized_jsd", {"beta": 0.3}),
    ("skew_forward_kl", torch_kernels.SkewForwardKL(0.2), "skew_forward_kl", {"alpha": 0.2}),
    ("skew_reverse_kl", torch_kernels.SkewReverseKL(0.4), "skew_reverse_kl", {"alpha": 0.4}),
    ("zero", torch_kernels.Zero(), "skew_forward_kl", {"alpha": 1.0}),
]
# The float64 kernels must equal the float64 torch kernels to rounding. In float32 the gradient is ill-conditioned
# (`pi (h - H)` cancels; the torch kernels' own float32 gradient is ~5e-5 off the float64 one on these rows), so
# there each result is measured against the float64 torch result on the same logits and must be within twice the
# torch float32 kernels' error plus FLOAT32_SLACK: no less accurate than the path it replaces.
FLOAT64_TOLERANCE = 1e-12
FLOAT32_SLACK = 2e-6
NEG_INF = float("-inf")
# Whether the project environment has triton (a GPU machine's CUDA torch brings it); read without importing it.
MAIN_ENV_HAS_TRITON = importlib.util.find_spec("triton") is not None
SECTION = "== "  # the child's line that closes a section of checks
CHILD_TIMEOUT_S = 600  # about 20 s alone on 2 cores (most of it importing torch and interpreting numpy)


def _logits(rows: int, vocab: int, padded: int, dtype: torch.dtype, device: str = "cpu",
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits `[rows, padded]` (the last `padded - vocab` columns -inf: vocabulary padding).
    Row 0: the student masks a token the teacher has mass on; row 1 the other way round, and a student
    probability that underflows to 0 in float32 (not in float64) where the teacher has mass; row 2 both mask one;
    row 3 both mask the last third (at TP = 3 a shard without mass)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, padded, generator=gen, dtype=torch.float64) * 4
    teacher = torch.randn(rows, padded, generator=gen, dtype=torch.float64) * 4
    student[:, vocab:] = teacher[:, vocab:] = NEG_INF
    student[0, 3] = NEG_INF
    teacher[1, 5] = NEG_INF
    student[1, 8] = -150.0  # exp(-150 / 0.7 - lse) < 1e-45
    student[2, 7] = teacher[2, 7] = NEG_INF
    student[3, 2 * padded // 3:] = teacher[3, 2 * padded // 3:] = NEG_INF
    return student.to(dtype).to(device), teacher.to(dtype).to(device)


def _reference(kernel: torch_kernels.DivergenceKernel, student: torch.Tensor, teacher: torch.Tensor,
               scale: torch.Tensor, dtype: torch.dtype, shards: Optional[list[slice]] = None
               ) -> dict[str, torch.Tensor]:
    """What `divergences._Divergence` computes with the torch kernels on the real columns (`fix` for the rows
    whose statistics have NaN products, NaN gradient entries zeroed there): the normalisers, log-probs,
    statistics and gradient; with `shards`, as at TP = len(shards): the shards' local normalisers combined, the
    statistics summed over the shards."""
    z, t = student.to(dtype) / TAUS[0], teacher.to(dtype) / TAUS[1]
    pieces = shards or [slice(0, z.shape[1])]
    lse = _combined_normalizers([torch.stack([torch.logsumexp(z[:, cols], -1), torch.logsumexp(t[:, cols], -1)])
                                 for cols in pieces])
    lp, lq = z - lse[0][:, None], t - lse[1][:, None]
    stats = sum(kernel.statistics_of(lp[:, cols].clone(), lq[:, cols].clone(),
                                     [torch.empty_like(lp[:, cols]) for _ in range(max(kernel.forward_buffers, 1))],
                                     fix=True).clone() for cols in pieces)
    gradient = torch.empty_like(lp)
    kernel.gradient(lp.clone(), lq.clone(), stats, scale, [torch.empty_like(lp) for _ in
                                                           range(kernel.backward_buffers)], gradient)
    return {"lse": lse, "lp": lp, "lq": lq, "stats": stats, "gradient": gradient.nan_to_num(nan=0.0)}


def _combined_normalizers(local: list[torch.Tensor]) -> torch.Tensor:
    """The global normalisers from the shards' local ones, as `divergences._global_normalizers` combines them
    (all-reduce MAX, then SUM of the rescaled exp-sums; a shard without mass adds 0)."""
    stacked = torch.stack(local)
    top = stacked.amax(dim=0)
    return top + torch.where(torch.isneginf(stacked), 0.0, (stacked - top).exp()).sum(dim=0).log()


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference relative to the largest finite reference entry; infinities must match exactly."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    infinite = torch.isinf(expected)
    if not torch.equal(torch.isinf(actual), infinite) or not torch.equal(actual[infinite], expected[infinite]):
        return float("inf")
    if bool(torch.isnan(actual).any()) or bool(torch.isnan(expected).any()):
        return float("inf")
    finite = expected[~infinite]
    scale = max(float(finite.abs().max()), 1e-30) if finite.numel() else 1.0
    return float((actual[~infinite] - finite).abs().max() / scale) if finite.numel() else 0.0


def _shards(padded: int, tp: int) -> list[slice]:
    """The column shards `[V/tp]` of a padded row, megatron's layout (the padding in the last)."""
    width = -(-padded // tp)
    return [slice(rank * width, min((rank + 1) * width, padded)) for rank in range(tp)]


@functools.cache  # the logits are the same for every divergence: the interpreter runs the normalisers once
def _triton_normalizers(dtype: torch.dtype, input_dtype: Optional[torch.dtype], rows: int, vocab: int, padded: int,
                        tp: int, device: str, row_block: Optional[int], shard_block: Optional[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton normalisers `[2, rows]` of `_logits(...)`: of the whole row, and at TP = `tp` the shards' local
    ones combined as the all-reduces combine them."""
    student, teacher = _logits(rows, vocab, padded, input_dtype or dtype, device)
    whole = td.local_normalizers(student, teacher, *TAUS, dtype, block_size=row_block)
    local = [td.local_normalizers(student[:, cols], teacher[:, cols], *TAUS, dtype, block_size=shard_block)
             for cols in _shards(padded, tp)]
    return whole, _combined_normalizers(local)


def compare_with_torch(kernel: torch_kernels.DivergenceKernel, kind: str, parameters: dict, dtype: torch.dtype,
                       input_dtype: Optional[torch.dtype] = None, rows: int = 4, vocab: int = 37, padded: int = 39,
                       tp: int = 3, device: str = "cpu", row_block: Optional[int] = 16, shard_block: Optional[int] = 8
                       ) -> dict[str, tuple[float, float]]:
    """Per check, `(error of the Triton kernels, error of the torch kernels in dtype at the same TP)`, both
    relative to the float64 torch kernels (`_reference`) on the same logits (the value: to
    `divergence_from_log_probs`): at TP = 1 on the whole padded row, and at TP = `tp` on column shards (the last
    with the padding), statistics summed over the shards as the all-reduce SUM sums them. For the padded columns,
    the largest gradient entry (must be 0) and 0."""
    student, teacher = _logits(rows, vocab, padded, input_dtype or dtype, device)
    gen = torch.Generator().manual_seed(1)
    scale = (torch.randn(rows, generator=gen, dtype=torch.float64) / TAUS[0]).to(device)
    real_shards = [slice(cols.start, min(cols.stop, vocab)) for cols in _shards(padded, tp) if cols.start < vocab]
    exact = _reference(kernel, student[:, :vocab], teacher[:, :vocab], scale, torch.float64)
    same_dtype = {1: _reference(kernel, student[:, :vocab], teacher[:, :vocab], scale.to(dtype), dtype),
                  tp: _reference(kernel, student[:, :vocab], teacher[:, :vocab], scale.to(dtype), dtype, real_shards)}
    scale = scale.to(dtype)
    errors = {}

    # Where the divergence is infinite (the reverse KL of row 1) its gradient is no one's to define
    # (`divergences.vocab_parallel_divergence`): the gradients are compared on the other rows.
    finite_rows = torch.isfinite(exact["stats"]).all(dim=0)

    def check(name: str, actual: torch.Tensor, key: str) -> None:
        torch_result, expected = same_dtype[tp if name.startswith(f"tp{tp} ") else 1][key], exact[key]
        if key == "gradient":
            actual, torch_result, expected = actual[finite_rows], torch_result[finite_rows], expected[finite_rows]
        errors[name] = (_error(actual, expected), _error(torch_result, expected))

    # TP = 1: the whole row, padded columns included (they must count nothing and get 0 gradient).
    lse, global_lse = _triton_normalizers(dtype, input_dtype, rows, vocab, padded, tp, device, row_block,
                                          shard_block)
    stats = td.statistics_from_logits(kernel, student, teacher, lse, *TAUS, block_size=row_block)
    gradient = td.gradient_from_logits(kernel, student, teacher, lse, stats, scale, *TAUS, block_size=row_block)
    check("tp1 normalizers", lse, "lse")
    check("tp1 statistics", stats, "stats")
    check("tp1 gradient", gradient[:, :vocab], "gradient")
    errors["tp1 padded gradient"] = (float(gradient[:, vocab:].abs().max()), 0.0)
    # The value against the reference, where the reference is finite (`divergence_kernels.py`: an entry whose
    # weight is 0 while the other side is -inf counts 0 in the kernels, +inf in the reference).
    reference = divergence_from_log_probs(kind, exact["lp"], exact["lq"], **parameters)
    finite = torch.isfinite(reference)
    errors["tp1 value vs reference"] = (_error(kernel.value(stats)[finite], reference[finite]),
                                        _error(kernel.value(same_dtype[1]["stats"])[finite], reference[finite]))

    # TP = tp: column shards of width ceil(padded / tp), each read in place as a column slice (row stride =
    # padded), the gradient written into the matching slice of one buffer.
    partial = [td.statistics_from_logits(kernel, student[:, cols], teacher[:, cols], global_lse, *TAUS,
                                         block_size=shard_block) for cols in _shards(padded, tp)]
    all_reduced = torch.stack(partial).sum(dim=0)
    sharded_gradient = torch.full(student.shape, float("nan"), dtype=dtype, device=device)
    for cols in _shards(padded, tp):
        td.gradient_from_logits(kernel, student[:, cols], teacher[:, cols], global_lse, all_reduced, scale, *TAUS,
                                out=sharded_gradient[:, cols], block_size=shard_block)
    check(f"tp{tp} normalizers", global_lse, "lse")
    check(f"tp{tp} statistics", all_reduced, "stats")
    check(f"tp{tp} gradient", sharded_gradient[:, :vocab], "gradient")
    errors[f"tp{tp} padded gradient"] = (float(sharded_gradient[:, vocab:].abs().max()), 0.0)
    return errors


def failed_checks(label: str, errors: dict[str, tuple[float, float]], dtype: torch.dtype,
                  slack: float = FLOAT32_SLACK) -> list[str]:
    """The checks of `compare_with_torch` that fail (module constants), printing every one."""
    failures = []
    for name, (error, torch_error) in errors.items():
        bound = FLOAT64_TOLERANCE if dtype == torch.float64 else 2.0 * torch_error + slack
        ok = error == 0.0 if "padded" in name else error <= bound
        print(f"{'ok  ' if ok else 'FAIL'} {label} {name}: {error:.3g} (torch kernels {torch_error:.3g})")
        if not ok:
            failures.append(f"{label} {name}: relative error {error:.3g} > {bound:.3g}")
    return failures


def interpreter_checks() -> list[str]:
    """Every case in float32 and float64 (and bfloat16 logits computed in float32 for one), on the CPU under the
    interpreter; returns the failures, one line each, and prints every error."""
    failures = []
    runs = [(case, dtype, None) for case in CASES for dtype in (torch.float32, torch.float64)]
    runs.append((CASES[3], torch.float32, torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's exp / log of -inf and 0 in the interpreter
        for (name, kernel, kind, parameters), dtype, input_dtype in runs:
            label = f"{name} {dtype}" + (f" from {input_dtype} logits" if input_dtype else "")
            failures += failed_checks(label, compare_with_torch(kernel, kind, parameters, dtype, input_dtype), dtype)
    return failures


def _interpreting() -> bool:
    """Whether this process's triton runs its interpreter (the variable was set before triton was imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and "triton" in sys.modules


@contextlib.contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (None: unset) environment variables for the block, then restore them."""
    def assign(settings: dict[str, Optional[str]]) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    saved = {name: os.environ.get(name) for name in values}
    assign(values)
    try:
        yield
    finally:
        assign(saved)


@contextlib.contextmanager
def _compiler_triton() -> Iterator[object]:
    """A copy of `triton_divergences` whose kernels are compiler-side `JITFunction`s, inside a `triton` imported anew
    without the interpreter (and TRITON_INTERPRET unset), for the block; then this process's triton again.

    Under TRITON_INTERPRET=1 `triton.jit` made every jit function an interpreter one when it was decorated, triton's
    own too (`tl.sum`, `tl.cdiv`, ...), and the compiler accepts none of them: so the Python modules of triton are
    imported a second time (its C extension `triton._C` stays: it holds no interpreter state), and the kernels are
    taken from a second copy of the module, executed against that triton."""
    interpreted = {name: module for name, module in sys.modules.items()
                   if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")}
    for name in interpreted:
        del sys.modules[name]
    try:
        with _environment(TRITON_INTERPRET=None):
            spec = importlib.util.spec_from_file_location(f"{td.__name__}_compiled", td.__file__)
            compiled_td = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(compiled_td)  # its `import triton` is the new one
            yield compiled_td
    finally:
        for name in [name for name in sys.modules if name == "triton" or name.startswith("triton.")]:
            if not name.startswith("triton._C"):
                del sys.modules[name]
        sys.modules.update(interpreted)


def compile_checks() -> list[str]:
    """What the interpreter accepts the GPU compiler may not (it runs the Python, not Triton's typed frontend): each
    kernel, every divergence branch, compiled for sm_90 to a cubin on the CPU (bfloat16 logits, float32 compute;
    the normalisers also float64), as the first CUDA call would compile it; and outside the interpreter a CPU
    tensor is a clear error. Returns the failures, one line each."""
    failures = []
    # A fresh cache directory: compile, do not load an earlier build.
    with tempfile.TemporaryDirectory() as cache, _environment(TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1"), \
            _compiler_triton() as compiled_td:
        triton = compiled_td.triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        try:
            compiled_td.local_normalizers(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 1.0, torch.float32)
            failures.append("a CPU tensor outside the interpreter: no error, expected a ValueError")
        except ValueError as error:
            if "run on CUDA tensors, got a cpu tensor" not in str(error):
                failures.append(f"a CPU tensor outside the interpreter: {error}")
        print(f"{'FAIL' if failures else 'ok  '} a CPU tensor outside the interpreter is a clear error")

        scalars = {"student_temperature": "fp64", "teacher_temperature": "fp64", "ratio": "fp64",
                   "coefficient": "fp64"}

        def compiled(label: str, kernel, pointers: dict[str, str], constants: dict):
            signature = {name: pointers.get(name) or scalars.get(name) or ("constexpr" if name.isupper() else "i32")
                         for name in kernel.arg_names}
            try:
                build = triton.compile(ASTSource(kernel, signature, constexprs=constants),
                                       target=GPUTarget("cuda", 90, 32))
            except Exception as error:  # a compiler error names the kernel line: keep it whole
                failures.append(f"sm_90 compile of {label}: {type(error).__name__}: {error}")
                print(f"FAIL {failures[-1]}")
                return None
            ok = len(build.asm["cubin"]) > 0
            print(f"{'ok  ' if ok else 'FAIL'} sm_90 compile of {label}: {len(build.asm['cubin'])} bytes of cubin")
            if not ok:
                failures.append(f"sm_90 compile of {label}: an empty cubin")
            return build

        compiled("normalizers float64", compiled_td._normalizers_kernel,
                 {"student_ptr": "*fp64", "teacher_ptr": "*fp64", "out_ptr": "*fp64"},
                 {"COMPUTE": compiled_td.tl.float64, "BLOCK": compiled_td.ROW_BLOCK})
        logits = {"student_ptr": "*bf16", "teacher_ptr": "*bf16"}
        rows = {"lse_ptr": "*fp32", "stats_ptr": "*fp32", "scale_ptr": "*fp32"}
        gradient = None
        for kind in range(6):
            compiled(f"statistics kind {kind}", compiled_td._statistics_kernel, {**logits, **rows, "out_ptr": "*fp32"},
                     {"KIND": kind, "COMPUTE": compiled_td.tl.float32, "BLOCK": compiled_td.ROW_BLOCK})
            gradient = compiled(f"gradient kind {kind}", compiled_td._gradient_kernel,
                                {**logits, **rows, "out_ptr": "*bf16"},
                                {"KIND": kind, "COMPUTE": compiled_td.tl.float32, "BLOCK": compiled_td.GRADIENT_BLOCK})
    # The gradient rounds to bfloat16 to nearest even, as torch's `.to(torch.bfloat16)` does.
    if gradient is not None and "cvt.rn.bf16.f32" not in gradient.asm["ptx"]:
        failures.append("the bfloat16 gradient does not round to nearest even (no cvt.rn.bf16.f32 in the PTX)")
        print(f"FAIL {failures[-1]}")
    return failures


def _child_python() -> str:
    """The python that runs the checks: the Triton venv's (`triton_env.py`), or this interpreter where the project
    environment has triton itself (CUDA torch brings it) and `OPD_TRITON_VENV` does not name another."""
    if MAIN_ENV_HAS_TRITON and triton_env.VENV_ENV not in os.environ:
        return sys.executable
    try:
        return triton_env.triton_python()
    except triton_env.TritonUnavailable as error:
        pip_output = str(error)
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: the Triton venv could not be built, so the Triton kernels cannot be checked "
                    f"(.ci/run builds it with `python -m tests.parallel.triton_env`):\n{pip_output}", pytrace=False)
    pytest.skip(f"no Triton venv, the Triton divergence kernels are not checked: pip could not install "
                f"triton=={triton_env.TRITON_VERSION} ({pip_output.splitlines()[-1]})")


@pytest.fixture(scope="module")
def triton_child() -> subprocess.CompletedProcess:
    """One child process, `<Triton venv python> -m tests.parallel.test_triton_divergences` with TRITON_INTERPRET=1
    in the repository: the interpreter checks, then the compile checks, each closed by a `== <title>: passed` or
    `== <title>: FAILED` line. One process, because each start imports torch (seconds on 2 cores)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY), env.get("PYTHONPATH")]))
    return subprocess.run([_child_python(), "-m", "tests.parallel.test_triton_divergences"], cwd=REPOSITORY,
                          env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def _section(child: subprocess.CompletedProcess, title: str) -> str:
    """The child's output for `title` (the lines after the previous section's closing line); fails the test with
    that output and the child's stderr unless the section passed."""
    lines, section = child.stdout.splitlines(), []
    for line in lines:
        if line.startswith(SECTION):
            if line == f"{SECTION}{title}: passed":
                return "\n".join(section)
            if line.startswith(f"{SECTION}{title}:"):
                break
            section = []
        else:
            section.append(line)
    shown = "\n".join(section)[-8000:]
    pytest.fail(f"{title} in the Triton child (exit {child.returncode}) failed or did not run:\n{shown}\n"
                f"--- stderr ---\n{child.stderr[-4000:]}", pytrace=False)


def _assert_triton_not_imported_here() -> None:
    """The checks ran in the child: this process (pytest's), whose environment has no triton, never imported it
    (where the environment has it, megatron-core imports it anyway: nothing to check)."""
    assert MAIN_ENV_HAS_TRITON or "triton" not in sys.modules, "the pytest process imported triton from somewhere"


def test_triton_kernels_equal_torch_kernels_under_the_interpreter(triton_child):
    output = _section(triton_child, "interpreter checks")
    assert "FAIL" not in output and output.count("ok  ") >= 100, output
    _assert_triton_not_imported_here()


def test_every_kernel_compiles_for_a_gpu_without_one(triton_child):
    output = _section(triton_child, "sm_90 compile")
    assert output.count("ok   sm_90 compile of") == 13, output
    _assert_triton_not_imported_here()


def test_kernel_codes_and_selection(monkeypatch):
    """Each torch kernel maps to its Triton kind; an unknown kernel is a clear error; CPU tensors and
    OPD_DISABLE_TRITON=1 keep the torch kernels; without triton the kernels are a clear error."""
    assert [td.kernel_code(kernel)[0] for _, kernel, _, _ in CASES[:6]] == [
        td.FORWARD_KL, td.REVERSE_KL, td.TOTAL_VARIATION, td.GENERALIZED_JSD, td.SKEW_FORWARD_KL, td.SKEW_REVERSE_KL]
    assert td.kernel_code(torch_kernels.GeneralizedJSD(0.25))[1:] == (3.0, 0.75)
    assert td.kernel_code(torch_kernels.SkewReverseKL(0.2))[1:] == (0.25, 1.0)

    class Unknown(torch_kernels.ForwardKL.__base__):
        statistics_of = statistics_function = gradient_function = gradient = None

    with pytest.raises(TypeError, match="no Triton kernel for Unknown"):
        td.kernel_code(Unknown())
    assert not td.use_triton(torch.zeros(2, 3))
    if not td.triton_available():
        with pytest.raises(RuntimeError, match="triton is not importable"):
            td.local_normalizers(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 1.0, torch.float32)
    if torch.cuda.is_available():
        cuda = torch.zeros(2, 3, device="cuda")
        assert td.use_triton(cuda) == td.triton_available()
        monkeypatch.setenv(td.DISABLE_TRITON_ENV, "1")
        assert not td.use_triton(cuda)
        assert not td.use_triton(cuda.long())
    _assert_triton_not_imported_here()


requires_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and td.triton_available()),
                                          reason="needs a CUDA GPU and triton")


@pytest.mark.gpu
@requires_cuda_triton
@pytest.mark.parametrize("dtype, input_dtype", [(torch.float32, None), (torch.float64, None),
                                                (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_compiled_kernels_equal_torch_kernels_on_cuda(case, dtype, input_dtype):
    """The compiled kernels on CUDA, with the production block sizes, on a vocabulary wider than one block."""
    name, kernel, kind, parameters = case
    errors = compare_with_torch(kernel, kind, parameters, dtype, input_dtype, rows=16, vocab=9000, padded=9008,
                                tp=2, device="cuda", row_block=None, shard_block=None)
    # On the GPU float32 exp / log / division are approximate (a few ulp): a wider slack than on the CPU.
    failures = failed_checks(f"{name} {dtype}", errors, dtype, slack=10 * FLOAT32_SLACK)
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@requires_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_divergences_with_and_without_triton_agree_on_cuda(dtype, monkeypatch):
    """`vocab_parallel_divergence` on CUDA through the Triton kernels (the default there) and through the torch
    kernels (`OPD_DISABLE_TRITON=1`): values and gradients, with vocabulary padding, masked tokens, temperatures
    and row chunks, each measured against the torch kernels in float64 on the same logits (float64: equal to
    rounding; otherwise within twice the torch kernels' own error plus a slack). Also that the Triton kernels
    really ran."""
    from opd_megatron.parallel import divergences as vp

    calls = []
    statistics = td.statistics_from_logits
    monkeypatch.setattr(td, "statistics_from_logits", lambda *args, **kw: calls.append(1) or statistics(*args, **kw))
    rows, vocab, width = 64, 31990, 32000
    student, teacher = _logits(rows, vocab, width, dtype, "cuda")
    student, teacher = student.reshape(2, rows // 2, width), teacher.reshape(2, rows // 2, width)
    upstream = torch.randn(2, rows // 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64).cuda()
    failures = []
    for _, _, kind, parameters in CASES:
        results = {}
        for path, logits_dtype in (("triton", dtype), ("torch", dtype), ("float64", torch.float64)):
            monkeypatch.setenv(td.DISABLE_TRITON_ENV, "0" if path == "triton" else "1")
            leaf = student.to(logits_dtype).detach().requires_grad_(True)
            value = vp.vocab_parallel_divergence(kind, leaf, teacher.to(logits_dtype), **parameters,
                                                 student_temperature=0.7, teacher_temperature=1.3,
                                                 true_vocab_size=vocab, chunk_size=24)
            value.backward(upstream.to(value.dtype))
            results[path] = (value.detach(), leaf.grad)
        finite = torch.isfinite(results["float64"][0])  # an infinite divergence's gradient is no one's to define
        for index, name in enumerate(("value", "gradient")):
            rows = slice(None) if index == 0 else finite
            error = _error(results["triton"][index][rows], results["float64"][index][rows])
            torch_error = _error(results["torch"][index][rows], results["float64"][index][rows])
            bound = FLOAT64_TOLERANCE if dtype == torch.float64 else 2.0 * torch_error + 10 * FLOAT32_SLACK
            if not error <= bound:
                failures.append(f"{kind} {parameters} {name}: {error:.3g} > {bound:.3g} (torch {torch_error:.3g})")
        if float(results["triton"][1][..., vocab:].abs().max()) != 0.0:
            failures.append(f"{kind} {parameters}: gradient on the padded columns")
    assert calls, ("the Triton kernels did not run on CUDA: divergences._Divergence must call triton_divergences "
                   "when use_triton(student)")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":  # the child process of the `triton_child` fixture
    if not _interpreting():
        sys.exit("run with TRITON_INTERPRET=1 in the environment (the kernels run on CPU tensors)")
    passed = {}
    for title, checks in (("interpreter checks", interpreter_checks), ("sm_90 compile", compile_checks)):
        try:
            passed[title] = not checks()  # each prints its checks, FAIL lines included
        except Exception:  # the next section still runs; the fixture's test shows this one's traceback
            print(f"FAIL {traceback.format_exc()}")
            passed[title] = False
        print(f"{SECTION}{title}: {'passed' if passed[title] else 'FAILED'}", flush=True)
    # Without interpreter shutdown: it would make nanobind list the first triton's bindings, which `_compiler_triton`
    # left without their module, as "leaked" on stderr (harmless, but it would bury a real error there).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if all(passed.values()) else 1)
