from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import write_synthetic_dataset


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """48 synthetic 16px images in 6 shards (so 2 ranks each read 3)."""
    out = tmp_path_factory.mktemp("metrics-data") / "shapes"
    write_synthetic_dataset(str(out), n=48, resolution=16, seed=3, samples_per_shard=8)
    return str(out)


@pytest.fixture
def cache(tmp_path: Path) -> str:
    return str(tmp_path / "cache")
