"""``python -m community.market ...``: the operator without the ``hems`` front end."""

from __future__ import annotations

import argparse
import logging
import sys

from community.market.operator import add_arguments, main_from_args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hems market", description="community market operator")
    add_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return main_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
