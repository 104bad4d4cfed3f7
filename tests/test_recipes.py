"""Every recipe in configs/recipes runs: its CPU twin (the recipe with configs/recipes/cpu_twins.yaml's overrides:
a tiny student, two steps on the CPU, a tiny random Llama as colocated teacher, or the real local vLLM server for
served teachers) trains as a real process (`python -m opd_megatron train`), exits 0 and logs finite losses."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.teachers.vllm_server import server_or_skip
from tests.tiny_hf import write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
TWINS = yaml.safe_load((RECIPES / "cpu_twins.yaml").read_text())
SERVED = {name for name, extra in TWINS["twins"].items()
          if "served" in extra or any("vllm" in str(item) for item in extra)}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    teacher = write_tiny_checkpoint(root / "teacher", arch="llama", seed=1)
    words = ["a b c", "1 2 3 =", "w10 w11", "x y z ?", "h e l l o", "5 + 7 =", "w42 w7 w99", "q r s t"]
    domains = ["math", "code", "chat", "math"]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": w, "response": "w5 w6 w7 </s>", "text": "w8 w9 </s>",
                                           "domain": domains[i % 4]}) + "\n" for i, w in enumerate(words)))
    return {"root": root, "hf_teacher": str(teacher), "prompts": str(prompts)}


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


def test_every_recipe_has_a_twin():
    assert sorted(TWINS["twins"]) == sorted(p.stem for p in RECIPES.glob("*.yaml") if p.name != "cpu_twins.yaml")


@pytest.mark.parametrize("name", sorted(TWINS["twins"]))
def test_cpu_twin_trains(name, shared, tmp_path):
    values = {"out": str(tmp_path), "hf_teacher": shared["hf_teacher"], "prompts": shared["prompts"], "vllm_url": ""}
    if name in SERVED:
        values["vllm_url"] = server_or_skip(shared["root"] / "vllm").url
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-m", "opd_megatron", "train", "--config", str(RECIPES / f"{name}.yaml"),
                             *twin_args(name, values)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    steps = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), losses
