"""python -m pyfast {info,bench,generate}."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyfast", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="print build info as JSON")
    b = sub.add_parser("bench", help="run the microbenchmarks, print a table, write JSON + PNG")
    from pyfast.bench.runner import add_arguments

    add_arguments(b)
    g = sub.add_parser("generate", help="LN-free GPT-2 generation, timed next to transformers' generate")
    from pyfast.lnfree.cli import add_arguments as add_generate_arguments

    add_generate_arguments(g)
    args = parser.parse_args(argv)
    if args.cmd == "info":
        import pyfast

        print(json.dumps(pyfast.build_info(), indent=2))
        return 0
    if args.cmd == "generate":
        from pyfast.lnfree.cli import run as generate

        return generate(args)
    from pyfast.bench.runner import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
