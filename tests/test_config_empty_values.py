"""An empty value (`key=` on the command line, `key:` or null in YAML) is null: fine for a key that may be null
(`checkpoint.load=`), and for any other key an error that names the key and says what it needs, a path for the path
keys, never `expected a string, got None` (issue 14)."""

import re

import pytest

from opd_megatron.config import ConfigError, load_config
from opd_megatron.config.run import from_dict

PATH_KEYS = ["teacher.colocated.path", "teacher.inprocess.path", "data.path", "data.tokenizer", "rollout.path",
             "eval.path", "run.output_dir", "quickstart.teacher_cache"]


@pytest.mark.parametrize("key", PATH_KEYS)
def test_an_empty_path_override_names_the_key_and_asks_for_a_path(key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: no value \(`{re.escape(key)}=` or null\); "
                                          rf"expected a path"):
        load_config(None, [f"{key}="])


def test_a_null_path_in_yaml_says_the_same():
    with pytest.raises(ConfigError, match=r"^teacher.colocated.path: no value .*; expected a path"):
        from_dict({"teacher": {"colocated": {"path": None}}})


def test_an_empty_string_key_that_is_not_a_path_asks_for_a_string():
    with pytest.raises(ConfigError, match=r"^run.name: no value \(`run.name=` or null\); expected a string$"):
        load_config(None, ["run.name="])


def test_an_empty_value_of_a_key_that_may_be_null_is_null():
    cfg = load_config(None, ["checkpoint.load=", "optim.decay_steps="])
    assert cfg.checkpoint.load is None and cfg.optim.decay_steps is None
