"""A vLLM rollout server that is down, or whose weight version moves, against `VLLMRolloutEngine` on local fake
servers (127.0.0.1): the errors name the server and say what was expected. The real-server twins (malformed rows, a
server stopped mid-run, an engine that disagrees with the trainer) are in tests/rollout/test_vllm_rollout.py."""

from __future__ import annotations

import threading

import pytest

from opd_megatron.config import ConfigError
from opd_megatron.errors import RolloutServerError
from opd_megatron.rollout.generate import SamplingConfig
from opd_megatron.rollout.served import VLLMRolloutEngine, WeightVersionMismatch
from opd_megatron.teachers.http import HTTPTeacherConfig
from tests.teachers.fake_server import FakeServer, free_port

VOCAB = 64
STOP = 2
CONFIG = SamplingConfig(max_new_tokens=3, n=2, stop_ids=(STOP,))
PROMPTS = [[1, 5, 9], [1, 7]]


def _engine(url: str, reply_retries: int = 2, sync=None) -> VLLMRolloutEngine:
    client = HTTPTeacherConfig(urls=[url], model="student", vocab_size=VOCAB, max_retries=1, backoff_s=0.01,
                               timeout_s=5.0, reply_retries=reply_retries).validate("rollout.server.")
    return VLLMRolloutEngine(client, VOCAB, pad_id=0, seed=3, dp_rank=0, sync=sync)


def _completions(body: dict, headers: dict) -> dict:
    choices = [{"index": j, "text": "", "token_ids": [10 + j, 11, STOP], "finish_reason": "stop",
                "logprobs": {"token_logprobs": [-0.5, -0.25, -1.0]}} for j in range(body["n"])]
    return {"id": "cmpl-1", "object": "text_completion", "model": "student", "choices": choices}


class Versions:
    """`GET /weight_info`: the server's version; the first `moving` reads each see an update land just after them
    (the next read reports the next version)."""

    def __init__(self, version: str = "1", moving: int = 0):
        self.version, self.moving, self.reads = version, moving, 0
        self.lock = threading.Lock()

    def __call__(self, body: dict, headers: dict) -> dict:
        with self.lock:
            self.reads += 1
            seen = self.version
            if self.moving:
                self.moving -= 1
                self.version = str(int(self.version) + 1)
            return {"weight_version": seen}


def _routes(versions: Versions) -> dict:
    return {("GET", "/weight_info"): versions, ("POST", "/v1/completions"): _completions}


def test_a_rollout_server_down_at_start_is_an_error_naming_it():
    url = f"http://127.0.0.1:{free_port()}"      # nothing listens there
    engine = _engine(url)
    # The first request of a run reads the server's weight version: one GET, no retries, the URL named at once.
    with pytest.raises(RolloutServerError, match=rf"GET {url}/weight_info failed: ConnectError.*is the rollout "
                                                 rf"server running at this address\?"):
        engine.generate(PROMPTS, CONFIG, sample_key=("rollout", 0))
    engine.close()


def test_a_missing_rollout_api_key_names_the_rollout_section(monkeypatch):
    """The transport is shared with the teachers; its messages name the section the servers came from."""
    monkeypatch.delenv("OPD_TEST_ROLLOUT_KEY", raising=False)
    client = HTTPTeacherConfig(urls=["http://127.0.0.1:9"], model="student", vocab_size=VOCAB,
                               api_key_env="OPD_TEST_ROLLOUT_KEY").validate("rollout.server.")
    with pytest.raises(ConfigError, match=r"^rollout\.server\.api_key_env: the environment variable "
                                          r"'OPD_TEST_ROLLOUT_KEY' is not set"):
        VLLMRolloutEngine(client, VOCAB, pad_id=0, seed=3, dp_rank=0)


def test_weight_versions_that_move_during_a_batch_ask_again_then_stop_after_reply_retries():
    # One move (an update landed mid-batch): the batch is asked again and the second is used.
    versions = Versions(moving=1)
    with FakeServer(_routes(versions)) as server:
        engine = _engine(server.url)
        batch = engine.generate(PROMPTS, CONFIG, sample_key=("rollout", 0))
        assert batch.size == 4 and engine.regenerated == 1
        assert len(server.posts("/v1/completions")) == 2 * len(PROMPTS)
        engine.close()
    # Moving under every batch: 1 + reply_retries attempts, each discarded, then an error with the versions seen.
    versions = Versions(moving=10**6)
    with FakeServer(_routes(versions)) as server:
        engine = _engine(server.url, reply_retries=1)
        with pytest.raises(RolloutServerError) as caught:
            engine.generate(PROMPTS, CONFIG, sample_key=("rollout", 0))
        message = str(caught.value)
        assert not isinstance(caught.value, WeightVersionMismatch)    # the final error, not one attempt's
        assert "no acceptable rollout batch after 2 attempt(s) (rollout.server.reply_retries=1)" in message, message
        assert "weight versions moved during the batch" in message and server.url in message, message
        assert engine.regenerated == 2 and len(server.posts("/v1/completions")) == 2 * len(PROMPTS)
        engine.close()


class _StuckSync:
    """A weight sync whose reload never takes (a restarted server that cannot load the published weights)."""
    version = 7

    def __init__(self):
        self.reloads: list[list[str]] = []

    def reload(self, urls):
        self.reloads.append(list(urls))

    def close(self):
        pass


def test_a_server_on_another_weight_version_is_reloaded_and_an_error_if_it_stays_there():
    versions = Versions(version="default")        # vLLM's answer after a restart
    sync = _StuckSync()
    with FakeServer(_routes(versions)) as server:
        engine = _engine(server.url, sync=sync)
        with pytest.raises(RolloutServerError, match=rf"rollout servers \{{'{server.url}': 'default'\}} still report "
                                                     rf"another weight version than 7 after a reload"):
            engine.generate(PROMPTS, CONFIG, policy_version=7, sample_key=("rollout", 0))
        assert sync.reloads == [[server.url]] and server.posts("/v1/completions") == []   # nothing was sampled
        engine.close()
