"""A run told to start from a checkpoint that is not there: `checkpoint.load` naming a missing directory, a directory
without any complete checkpoint, or an incomplete `iter_*` directory is a FileNotFoundError naming the path before
anything is built (`loop/common.py::starting_point`), never a silent fresh start."""

from __future__ import annotations

import pytest

from opd_megatron.config import CheckpointSection
from opd_megatron.loop.common import LoadMeaning, starting_point


@pytest.mark.parametrize("meaning", list(LoadMeaning))
def test_a_checkpoint_load_with_nothing_to_load_names_the_path(tmp_path, meaning):
    own = tmp_path / "run" / "checkpoints"              # the run has no checkpoints of its own yet
    missing = tmp_path / "no_such_run" / "checkpoints"
    with pytest.raises(FileNotFoundError, match=f"checkpoint.load='{missing}': no complete checkpoint there"):
        starting_point(CheckpointSection(load=str(missing)), own, meaning)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"checkpoint.load='{empty}': no complete checkpoint there"):
        starting_point(CheckpointSection(load=str(empty)), own, meaning)
    broken = tmp_path / "warm" / "iter_0000004"        # a save that died before its metadata.json
    broken.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"checkpoint '{broken}' is incomplete or not a dist_checkpointing "
                                                f"checkpoint \\(no metadata.json\\)"):
        starting_point(CheckpointSection(load=str(broken)), own, meaning)
