"""Hypothesis strategies for fuzzing what a server sends back (tests/teachers/test_reply_fuzz.py for the teachers'
replies, tests/rollout/test_rollout_reply_fuzz.py for the rollout engines'): any JSON value with the numbers a server
could send, and a valid reply with one place replaced, removed or duplicated."""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# OPD_FUZZ_EXAMPLES raises the example count for a longer hunt (3,000 per test found nothing beyond the regressions
# the fuzz tests write down); CI runs 200.
FUZZ = settings(deadline=None, max_examples=int(os.environ.get("OPD_FUZZ_EXAMPLES", "200")),
                suppress_health_check=[HealthCheck.too_slow])

KEYS = ("index", "meta_info", "choices", "prompt_logprobs", "logprob", "token_ids", "logprobs", "token_logprobs",
        "output_ids", "finish_reason", "weight_version", "type", "matched", "length")


def json_values(ids: Sequence[int] = ()) -> st.SearchStrategy[Any]:
    """Any JSON value, with the numbers a server could send: huge integers, NaN/inf, subnormals, negative zero, the
    vocabulary's edges `ids`, digit strings Python's int() reads or refuses."""
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2 ** 70, max_value=2 ** 70)
               | st.sampled_from([10 ** 400, -10 ** 400, 2 ** 63, -1, 0, *ids])
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=8) | st.sampled_from(["0", "7", "²", "١", "-3", "63", "64", "1e3", " 5"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                        | st.dictionaries(st.text(max_size=6) | st.sampled_from(KEYS), inner, max_size=5),
                        max_leaves=25)


def _places(value, path=()):
    """Every place in a JSON value: (path to the container, key or index)."""
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((path, key))
            out.extend(_places(item, path + (key,)))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out.append((path, index))
            out.extend(_places(item, path + (index,)))
    return out


def mutate(reply, data, values: st.SearchStrategy[Any]):
    """A copy of `reply` with one place replaced by a draw of `values`, removed, or duplicated (lists)."""
    reply = copy.deepcopy(reply)
    places = _places(reply)
    if not places:
        return data.draw(values)
    path, key = data.draw(st.sampled_from(places))
    container = reply
    for step in path:
        container = container[step]
    action = data.draw(st.sampled_from(["replace", "remove", "duplicate"]))
    if action == "replace":
        container[key] = data.draw(values)
    elif action == "remove":
        del container[key]
    elif isinstance(container, list):
        container.insert(key, copy.deepcopy(container[key]))
    return reply
