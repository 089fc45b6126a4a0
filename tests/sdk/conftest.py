from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sdk.cluster import Cluster, run_cluster


@pytest.fixture(scope="session")
def cluster(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with run_cluster(tmp_path_factory.mktemp("sdk-cluster"), tiny_llama) as running:
        yield running
