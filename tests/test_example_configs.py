"""Every example config in configs/ loads and validates for the world size its header states."""

import re
from pathlib import Path

import pytest

from meshweave.train.config import load_config
from meshweave.train.validate import validate

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    header = re.search(r"# world_size: (\d+)", path.read_text())
    assert header, f"{path.name} must state '# world_size: N' in its header"
    assert validate(load_config(path), int(header.group(1))) == []


def test_default_yaml_is_the_embedded_default():
    path = Path(__file__).parent.parent / "configs" / "default.yaml"
    assert load_config(path) == load_config(None)
