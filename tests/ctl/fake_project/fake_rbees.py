"""Stands in for rbees-pool (and hf) after `rbees pool dev setup` installed this fake project."""

import sys


def main() -> None:
    print("fake rbees-pool", " ".join(sys.argv[1:]))
