import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import Webhook  # noqa: E402


@pytest.fixture(scope="session")
def webhook(tmp_path_factory):
    w = Webhook(tmp_path_factory.mktemp("webhook"))
    yield w
    w.stop()
