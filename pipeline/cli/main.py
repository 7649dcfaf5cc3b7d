"""`recsys`: one command line for every job."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from pydantic import ValidationError

from pipeline.errors import DataError

# sub-command modules: data build (ingest, synth, build-matrix), training (train, gate, rollback, ...),
# inference (infer, recs), research (experiment)
COMMAND_MODULES = ("pipeline.cli.data", "pipeline.cli.training", "pipeline.cli.serving", "pipeline.cli.research")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys", description="Multi-VAE + PIA recommender pipeline")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO level (with --no-progress, training logs one line per epoch instead of bars)")
    sub = p.add_subparsers(dest="command", required=True)

    # Each job area registers its own sub-commands (register(sub)); heavy imports stay inside the commands.
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (DataError, ValidationError) as e:
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError) as e:  # device not available, bad options: no traceback for users
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
