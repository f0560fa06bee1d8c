"""`meshweave bench`: the benchmark scripts as subcommands (issue 14)."""

from __future__ import annotations

import argparse
from typing import Callable


def register(sub: argparse._SubParsersAction, with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add this module's subcommand(s) to the `meshweave` parser."""
