import pytest

from kvmesh.localstack import LocalStack


@pytest.fixture(scope="session")
def stack(devcluster, tmp_path_factory):
    """manifests/ applied, the real webhook and controller processes running, the webhook
    configuration pointing at the local webhook; one per test session."""
    s = LocalStack(devcluster, tmp_path_factory.mktemp("stack"))
    s.up()
    yield s
    s.down()
