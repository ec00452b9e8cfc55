import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmesh.local.devcluster import DevCluster, find_bin_dir  # noqa: E402
from kvmesh.local.localstack import LocalStack  # noqa: E402
from support import Webhook  # noqa: E402


@pytest.fixture(scope="session")
def webhook(tmp_path_factory):
    w = Webhook(tmp_path_factory.mktemp("webhook"))
    yield w
    w.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs the local Kubernetes control plane (cluster/build.sh)")


@pytest.fixture(scope="session")
def devcluster(request):
    bin_dir = find_bin_dir()
    if bin_dir is None:
        msg = "control-plane binaries not built: run cluster/build.sh (or set KVMESH_K8S_BIN)"
        if os.environ.get("KVMESH_REQUIRE_CLUSTER") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    cluster = DevCluster(bin_dir, nodes=3, verbose=True)
    cluster.start()
    print(f"\ndevcluster: ready in {cluster.startup_seconds:.1f}s at {cluster.server}", file=sys.stderr)
    failed_before = request.session.testsfailed
    try:
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            cluster.mark_failed()  # keep the logs
        cluster.stop()


@pytest.fixture
def namespace(devcluster):
    name = f"t-{uuid.uuid4().hex[:10]}"
    devcluster.create_namespace(name, labels={"kvmesh-test": "true"})
    yield name
    devcluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def stack(devcluster, tmp_path_factory):
    """manifests/ applied, the real webhook and controller processes running, the webhook
    configuration pointing at the local webhook; one per test session (shared by tests/e2e and
    tests/p2p, so the two never run competing kvmesh processes on one control plane)."""
    s = LocalStack(devcluster, tmp_path_factory.mktemp("stack"))
    s.up()
    yield s
    s.down()
