"""Every recipe in configs/recipes runs: its CPU twin (the recipe with configs/recipes/cpu_twins.yaml's overrides:
a tiny student, two steps on the CPU, a tiny random Llama as colocated teacher, or the real local vLLM server for
served teachers) trains as a real process (`python -m opd_megatron train`), exits 0, logs finite losses, and shows
the one thing its recipe is for (RECIPE_CHECKS: a top-k recipe asks the teacher for k ids, a GAE recipe trains its
value head, a multi-teacher recipe sends each domain's rows to that domain's teacher, ...).

Served teachers are reached through a logging proxy (one per teacher URL, all in front of the one real vLLM
server), so the test sees every scoring request: which teacher got which rows, and with how many top-k ids."""

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import pytest
import yaml

from tests.teachers.fake_server import FakeServer, Reply
from tests.teachers.vllm_server import server_or_skip
from tests.tiny_hf import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
TWINS = yaml.safe_load((RECIPES / "cpu_twins.yaml").read_text())
SERVED = {name for name, extra in TWINS["twins"].items()
          if "served" in extra or any("vllm" in str(item) for item in extra)}
MEMBERS = ("math", "code", "general")   # the multi-teacher twin's teachers, each behind its own URL
ROUTES = {"math": "math", "code": "code"}  # mimo_mopd_qwen3_30b_a3b.yaml: routes; other domains go to `general`
TOPK = 5                                 # teacher.topk / opd.route_a.support_k of the top-k twins (cpu_twins.yaml)
RESPONSE, TEXT = "w5 w6 w7 </s>", "w8 w9 </s>"  # the prompts' reference answers (rollout.answer_key)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    teacher = write_tiny_checkpoint(root / "teacher", arch="llama", seed=1)
    words = ["a b c", "1 2 3 =", "w10 w11", "x y z ?", "h e l l o", "5 + 7 =", "w42 w7 w99", "q r s t"]
    domains = ["math", "code", "chat", "math"]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w, "response": RESPONSE, "text": TEXT,
                                           "domain": domains[i % 4]}) + "\n" for i, w in enumerate(words)))
    # (prompt ids, domain) of each prompt, tokenised as the run does: which domain a scored row belongs to.
    from opd_megatron.data.tokenizer import load_tokenizer
    from opd_megatron.rollout.prompts import PromptSource
    source = PromptSource(load_tokenizer(str(teacher)), seed=0, max_prompt_tokens=64, path=str(prompts),
                          domain_key="domain")
    return {"root": root, "hf_teacher": str(teacher), "prompts": str(prompts),
            "prompt_domains": [(p.ids, p.domain) for p in source.records]}


def twin_args(name: str, values: dict) -> list[str]:
    def fill(items):
        out = []
        for item in items:
            if item in ("served", "colocated"):
                out += fill(TWINS[item])
            else:
                out.append(str(item).format(**values))
        return out
    return fill(TWINS["common"]) + [f"run.name={name}"] + fill(TWINS["twins"][name])


# -- the runs ------------------------------------------------------------------------------------------------------

@dataclass
class ScoringRequest:
    """One scoring POST that reached a teacher URL: when (time.time(), comparable with metrics.jsonl's `time`),
    which teacher, the rows' token ids and the top-k asked for (vLLM's prompt_logprobs)."""
    time: float
    teacher: str
    rows: list[list[int]]
    topk: int


@dataclass
class TwinRun:
    result: subprocess.CompletedProcess
    steps: list[dict] = field(default_factory=list)   # metrics.jsonl records of the training steps (with "loss")
    evals: list[dict] = field(default_factory=list)   # the evaluation records (eval/*), before and after
    requests: list[ScoringRequest] = field(default_factory=list)
    prompt_domains: list[tuple[list[int], str]] = field(default_factory=list)  # (prompt ids, domain) per prompt

    def domain_of(self, row: list[int]) -> str:
        """The domain of the prompt that a scored row (prompt + response ids) starts with."""
        matches = {domain for ids, domain in self.prompt_domains if row[:len(ids)] == ids}
        assert len(matches) == 1, f"row {row} starts with no single prompt of the prompts file ({matches})"
        return matches.pop()

    def training_requests(self) -> list[ScoringRequest]:
        """The requests sent between the evaluation before training and the last step's log line."""
        start, end = self.evals[0]["time"], self.steps[-1]["time"]
        return [r for r in self.requests if start < r.time < end]


def logging_proxy(upstream: httpx.Client, teacher: str, log: list[ScoringRequest]) -> FakeServer:
    """A vLLM URL that forwards every call to `upstream` (the real server) and logs each scoring request."""
    def forward(method: str, path: str):
        def route(body: dict, headers: dict) -> Reply:
            if method == "POST":
                log.append(ScoringRequest(time.time(), teacher, body["prompt"], body["prompt_logprobs"]))
                reply = upstream.post(path, json=body)
            else:
                reply = upstream.get(path)
            return Reply(reply.content, status=reply.status_code)
        return route

    return FakeServer({(m, p): forward(m, p) for m, p in (("GET", "/health"), ("GET", "/v1/models"),
                                                          ("POST", "/v1/completions"))})


def _twin_env() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _corpus_and_cache(name: str, values: dict, root: Path) -> dict:
    """{corpus}, {held_out} and {cache} of a twin that trains from a teacher cache, as a user makes them: two indexed
    corpora of the prompts' words (`preprocess_jsonl`, the tiny teacher's tokenizer), then `opd-megatron cache-teacher`
    as a process, on the twin's own config (its data section: the same windows) with the tiny teacher in-process."""
    import random

    from opd_megatron.data.indexed import preprocess_jsonl
    from opd_megatron.data.tokenizer import load_tokenizer

    rng = random.Random(3)
    words = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(40)]
    tokenizer = load_tokenizer(values["hf_teacher"])
    paths = {"corpus": root / "corpus", "held_out": root / "held_out", "cache": root / "cache"}
    for corpus, documents in (("corpus", 30), ("held_out", 8)):
        lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(12, 40)))})
                 for _ in range(documents)]
        (root / f"{corpus}.jsonl").write_text("\n".join(lines) + "\n")
        preprocess_jsonl(root / f"{corpus}.jsonl", paths[corpus], tokenizer)
    values = {**values, **{key: str(path) for key, path in paths.items()}}
    result = subprocess.run([sys.executable, "-m", "opd_megatron", "cache-teacher", "--config",
                             str(RECIPES / f"{name}.yaml"), "--output", str(paths["cache"]), *twin_args(name, values),
                             "teacher.kind=inprocess", f"teacher.inprocess.path={values['hf_teacher']}"],
                            cwd=REPO, env=_twin_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return values


def _run_twin(name: str, shared: dict, out: Path) -> TwinRun:
    values = {"out": str(out), "hf_teacher": shared["hf_teacher"], "prompts": shared["prompts"]}
    if any("{cache}" in str(item) for item in TWINS["twins"][name]):
        values = _corpus_and_cache(name, values, out)
    requests: list[ScoringRequest] = []
    upstream, proxies = None, {}
    if name in SERVED:
        upstream = httpx.Client(base_url=server_or_skip(shared["root"] / "vllm").url, timeout=300.0)
        proxies = {teacher: logging_proxy(upstream, teacher, requests) for teacher in ("teacher", *MEMBERS)}
        values["vllm_url"] = proxies["teacher"].url
        values.update({f"vllm_url_{member}": proxies[member].url for member in MEMBERS})
    try:
        result = subprocess.run([sys.executable, "-m", "opd_megatron", "train", "--config",
                                 str(RECIPES / f"{name}.yaml"), *twin_args(name, values)],
                                cwd=REPO, env=_twin_env(), capture_output=True, text=True, timeout=600)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        if upstream is not None:
            upstream.close()
    run = TwinRun(result, requests=sorted(requests, key=lambda r: r.time), prompt_domains=shared["prompt_domains"])
    metrics = out / name / "metrics.jsonl"
    if result.returncode == 0 and metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        run.steps = [m for m in records if "loss" in m]
        run.evals = [m for m in records if any(k.startswith("eval/") for k in m)]
    return run


@pytest.fixture(scope="module")
def twins(shared, tmp_path_factory) -> Callable[[str], TwinRun]:
    """`twins(name)`: the twin's run, started once per module (tests of the same twin share it)."""
    runs: dict[str, TwinRun] = {}

    def get(name: str) -> TwinRun:
        if name not in runs:
            runs[name] = _run_twin(name, shared, tmp_path_factory.mktemp(name))
        return runs[name]
    return get


# -- what each recipe is for -----------------------------------------------------------------------------------------

def _every_step(run: TwinRun, key: str) -> list[float]:
    values = [m.get(key) for m in run.steps]
    assert all(isinstance(v, float) and math.isfinite(v) for v in values), f"{key}: expected a finite value at " \
                                                                          f"every step, got {values}"
    return values


def _asked_topk(run: TwinRun, k: int) -> None:
    """Every scoring request asked the served teacher for k top-k ids (vLLM's prompt_logprobs; 1 means the sampled
    token only: the client asks for at least one)."""
    asked = sorted({r.topk for r in run.requests})
    assert run.requests and asked == [k], f"prompt_logprobs of the {len(run.requests)} requests: {asked}, expected {k}"


def _fixed_dataset_rows(run: TwinRun, answer: str) -> None:
    """Off-policy steps train on the prompts' reference answers: no sampled row, and every response is the answer
    plus the end-of-sequence token the prompt source appends (whitespace tokens: one id per word)."""
    assert _every_step(run, "rollout/on_policy") == [0.0] * len(run.steps)
    assert _every_step(run, "rollout/response_length_mean") == [len(answer.split()) + 1.0] * len(run.steps)


def _fresh_ppo_ratio(run: TwinRun) -> None:
    """On fresh on-policy rows the PPO ratio pi_theta / pi_theta_old is 1 (the rows were sampled by these
    weights; docs/opd-math.md, Route B) and the clip removes nothing."""
    for ratio in _every_step(run, "importance/ratio_mean"):
        assert abs(ratio - 1.0) <= 1e-5, f"importance/ratio_mean {ratio} on fresh rows, expected 1"
    assert _every_step(run, "importance/clip_fraction") == [0.0] * len(run.steps)


def check_tm_opd(run: TwinRun) -> None:
    """[TM] reverse-KL policy gradient on the sampled token only: the teacher is asked for no top-k, and with the
    immediate estimator and kl_coef 1 the advantage is the log-ratio itself (A_t = log q - log pi)."""
    _asked_topk(run, 1)
    for m in run.steps:
        for stat in ("mean", "std"):
            a, r = m[f"advantage/{stat}"], m[f"log_ratio/{stat}"]
            assert abs(a - r) <= 1e-6 * max(abs(r), 1e-3), f"advantage/{stat} {a} != log_ratio/{stat} {r}"
    _fresh_ppo_ratio(run)


def check_s2w_offpolicy(run: TwinRun) -> None:
    """Strong-to-weak phase 1: forward KL on the teacher's top-k of fixed teacher responses."""
    _asked_topk(run, TOPK)
    _fixed_dataset_rows(run, RESPONSE)


def check_s2w_onpolicy(run: TwinRun) -> None:
    """Strong-to-weak phase 2: on the student's own samples, on the teacher's top-k."""
    _asked_topk(run, TOPK)
    assert _every_step(run, "rollout/on_policy") == [1.0] * len(run.steps)


def check_mopd(run: TwinRun) -> None:
    """MOPD: every training row was scored by its domain's teacher (math -> math, code -> code, any other ->
    general), every teacher got rows, and the truncated-IS gate ran."""
    seen = set()
    for request in run.training_requests():
        for row in request.rows:
            domain = run.domain_of(row)
            expected = ROUTES.get(domain, "general")
            assert request.teacher == expected, (f"a training row of domain {domain!r} went to teacher "
                                                 f"{request.teacher!r}, expected {expected!r}: {row}")
            seen.add(request.teacher)
    assert seen == set(MEMBERS), f"teachers that scored training rows: {sorted(seen)}, expected all of {MEMBERS}"
    assert all(0.0 <= v <= 1.0 for v in _every_step(run, "gates/truncated_is_keep_rate"))


def check_on_policy_mixture(run: TwinRun) -> None:
    """GKD / DistiLLM (on_policy_fraction 0.5): the two steps hold one fixed-dataset batch (the reference
    answers) and one batch of the student's samples, against the dense colocated teacher (exact reverse KL)."""
    on_policy = _every_step(run, "rollout/on_policy")
    assert sorted(on_policy) == [0.0, 1.0], f"rollout/on_policy per step: {on_policy}, expected one of each"
    fixed = run.steps[on_policy.index(0.0)]
    assert fixed["rollout/response_length_mean"] == len(RESPONSE.split()) + 1.0
    assert all(v >= 0.0 for v in _every_step(run, "kl/rkl_exact"))


def check_minillm(run: TwinRun) -> None:
    """MiniLLM's PPO ratio with clipping, on fresh samples."""
    _fresh_ppo_ratio(run)


def check_opsd(run: TwinRun) -> None:
    """OPSD: the frozen self-teacher is the initial student, so at the first step teacher and student share their
    weights and only the privileged context (the reference answer, inserted after the prompt) makes them differ:
    a positive exact reverse KL shows the teacher read it (without it, the divergence is exactly 0)."""
    rkl = _every_step(run, "kl/rkl_exact")
    assert rkl[0] > 1e-4, f"kl/rkl_exact at step 1 is {rkl[0]}: the self-teacher did not read the privileged context"
    # The evaluation before training meets the same teacher: its samples carry the privileged context too.
    before = run.evals[0]["eval/rkl"]
    assert before > 1e-4, f"eval/rkl before training is {before}: evaluation scored without the privileged context"


def check_pretrain_kd(run: TwinRun) -> None:
    """Pre-training logit KD from a teacher cache: whole corpus windows (no sampling, labels of up to
    data.seq_length), forward KL on the cached top-k, and no teacher at train time (no scoring request anywhere; the
    run refuses a cache whose windows are not its own, so finishing means it read its rows from the cache)."""
    assert run.requests == [], f"{len(run.requests)} scoring requests: a cache run must call no teacher"
    assert _every_step(run, "rollout/on_policy") == [0.0] * len(run.steps)
    assert all(0.0 < v <= 48.0 for v in _every_step(run, "rollout/response_length_max"))   # data.seq_length 48
    assert all(0.0 <= v <= 1.0 for v in _every_step(run, "agreement/teacher_top1_match"))   # the cached top-1
    assert all(v > 0.0 for v in _every_step(run, "loss"))


def check_gae(run: TwinRun) -> None:
    """GAE-OPD: the value head trains. It starts at zero, so the first step's explained variance is exactly 0
    (V = 0); after one update it differs. The advantages are GAE's discounted sums of the per-token rewards, not
    the per-token rewards themselves (the immediate estimator's)."""
    explained = _every_step(run, "value/explained_variance")
    assert explained[0] == 0.0 and explained[1] != 0.0 and explained[1] <= 1.0, explained
    first = run.steps[0]
    assert abs(first["advantage/mean"] - first["log_ratio/mean"]) > 0.1 * first["log_ratio/std"], first
    _asked_topk(run, 1)


def check_cr_opd(run: TwinRun) -> None:
    """CR-OPD: negative-advantage tokens are routed to candidates among the teacher's top-k."""
    _asked_topk(run, TOPK)
    assert all(0.0 < v <= 1.0 for v in _every_step(run, "routing/routed_rate"))
    assert all(1.0 <= v <= TOPK for v in _every_step(run, "routing/candidate_count_mean"))


def check_outcome_hybrid(run: TwinRun) -> None:
    """Outcome hybrid: the task verifier scored every training batch and the held-out evaluation."""
    assert all(0.0 <= v <= 1.0 for v in _every_step(run, "reward/mean"))
    assert all(0.0 <= m["eval/score"] <= 1.0 for m in run.evals) and len(run.evals) == 2


RECIPE_CHECKS: dict[str, Callable[[TwinRun], None]] = {
    "tm_opd_qwen3_8b": check_tm_opd, "qwen3_s2w_offpolicy": check_s2w_offpolicy,
    "qwen3_s2w_onpolicy": check_s2w_onpolicy, "mimo_mopd_qwen3_30b_a3b": check_mopd,
    "gkd_gpt2": check_on_policy_mixture, "minillm_gpt2": check_minillm,
    "distillm_skew_kl_gpt2": check_on_policy_mixture, "opsd_self_qwen3_8b": check_opsd,
    "pretrain_logit_kd_llama3_2_1b": check_pretrain_kd, "gae_opd_qwen3_8b": check_gae,
    "cr_opd_qwen3_8b": check_cr_opd, "outcome_hybrid_qwen3_1_7b": check_outcome_hybrid,
}

# -- tests ---------------------------------------------------------------------------------------------------------

def test_every_recipe_has_a_twin_and_a_check():
    recipes = sorted(p.stem for p in RECIPES.glob("*.yaml") if p.name != "cpu_twins.yaml")
    assert sorted(TWINS["twins"]) == recipes
    assert sorted(RECIPE_CHECKS) == recipes


@pytest.mark.parametrize("name", sorted(TWINS["twins"]))
def test_cpu_twin_trains(name, twins):
    run = twins(name)
    assert run.result.returncode == 0, run.result.stdout[-2000:] + run.result.stderr[-4000:]
    losses = [m["loss"] for m in run.steps]
    assert len(losses) == 2 and all(isinstance(x, float) and math.isfinite(x) for x in losses), losses
    RECIPE_CHECKS[name](run)


def test_multi_teacher_evaluation_rows_go_to_their_domain_teacher(twins):
    """Evaluation samples carry their prompts' domains (`rollout/prompts.py::with_prompt_context`), so eval/rkl is
    measured against each row's own teacher; before the fix every evaluation row went to the default member."""
    run = twins("mimo_mopd_qwen3_30b_a3b")
    if run.result.returncode != 0:
        pytest.fail(run.result.stdout[-2000:] + run.result.stderr[-4000:])
    training = run.training_requests()
    evaluation = [r for r in run.requests if r not in training]
    domains = {run.domain_of(row) for request in evaluation for row in request.rows}
    if not (len(evaluation) >= 2 and domains & set(ROUTES)):  # a broken premise must not count as the known bug
        pytest.fail(f"expected evaluation requests (before and after training) with rows of a routed domain "
                    f"{sorted(ROUTES)}; got {len(evaluation)} requests of domains {sorted(domains)}")
    for request in evaluation:
        for row in request.rows:
            expected = ROUTES.get(run.domain_of(row), "general")
            assert request.teacher == expected, (f"an evaluation row of domain {run.domain_of(row)!r} went to "
                                                 f"teacher {request.teacher!r}, expected {expected!r}")
