import os

import pytest

from tests.launch.slurm_cluster import SlurmCluster, missing_reason


def skip_or_fail(reason: str) -> None:
    """Outside CI a test that cannot run here skips with the reason; with CI=true it fails (.ci/run installs
    what these tests need, so a skip there would hide a broken setup)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A two-node Slurm cluster (n1, n2) on this machine for the session, its daemons stopped at the end."""
    reason = missing_reason()
    if reason:
        skip_or_fail(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
