"""`recsys`: one command line for every job.

Errors an operator can act on end the command with exit code 2 and one line per problem on stderr,
`recsys CMD: error: <problem>. Fix: <fix>`: a DataError, a configuration that fails validation (one line per
field), a path that is missing, a file or unwritable (OSError), an unreachable S3 endpoint. Anything else is a
bug and keeps its traceback. `-v` also logs the traceback of the handled errors.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import sys
import typing
from collections.abc import Collection, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from pipeline.errors import DataError
from pipeline.io import numba_target
from pipeline.io.redact import redact_text

# sub-command modules: data build (ingest, synth, build-matrix), training (train, gate, rollback, ...),
# inference (infer, recs), research (experiment)
COMMAND_MODULES = ("pipeline.cli.data", "pipeline.cli.training", "pipeline.cli.serving", "pipeline.cli.research")

log = logging.getLogger("recsys")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it in words ("default: the
    config's"); an option without a value (None) shows `none`. On/off flags and required options show nothing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (not action.option_strings or action.required or action.default is argparse.SUPPRESS or action.nargs == 0
                or "default" in text.lower()):
            return text
        shown = "none" if action.default is None else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


class _SubParser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def package_version() -> str:
    """The installed distribution's version (pyproject's), or `unknown` when run from a tree not installed."""
    try:
        return importlib.metadata.version("recsys-pia")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recsys", description="Multi-VAE + PIA recommender pipeline",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                   help="print the installed recsys-pia version and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO level (with --no-progress, training logs one line per epoch instead of bars)")
    # every sub-command's parser gets the same formatter (the area modules call sub.add_parser as usual)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_SubParser)

    # Each job area registers its own sub-commands (register(sub)); heavy imports stay inside the commands.
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    numba_target.guard()  # before numba loads: which of the image's compiled top-k kernels this CPU uses
    try:
        return int(args.func(args))
    except (DataError, ValidationError, OSError, RuntimeError, ValueError) as e:
        # RuntimeError, ValueError: device not available, bad options, unreadable Arrow data
        lines = error_lines(e, _flags(parser, args.command))
        log.info("details of the error", exc_info=e)  # -v: the traceback, for developers
    for line in lines:
        print(f"recsys {args.command}: error: {one_line(line)}", file=sys.stderr)
    return 2


def error_lines(e: BaseException, flags: Collection[str] = ()) -> list[str]:
    """The lines to print for an error the CLI handles (one, or one per field of a ValidationError)."""
    if isinstance(e, ValidationError):
        return validation_lines(e, flags)
    if isinstance(e, OSError):
        return [os_error_line(e)]
    text = str(e) or type(e).__name__
    if isinstance(e, DataError) or ". Fix: " in text:
        return [text]
    # a library's ValueError/RuntimeError (CUDA missing, Arrow, a codec): its text, and a fix that fits any
    return [str(DataError(text, "check the inputs and options of the command (-v logs where it failed)"))]


def one_line(text: str) -> str:
    """`text` on one line (library messages may span several) with credentials in URLs masked."""
    return redact_text(" ".join(text.split()))


# -- OSError: a path that is missing, a file, a folder, not writable; the network ----------------------------

_OS_FIXES: dict[int, tuple[str, str]] = {  # errno → (what is wrong, what to do)
    errno.ENOENT: ("does not exist", "check the path (and its spelling), or create what it names first"),
    errno.ENOTDIR: ("has a file where a folder is expected",
                    "pass a folder path, or move the file that is in the way"),
    errno.EISDIR: ("is a folder where a file is expected", "pass a file path, not a folder"),
    errno.EEXIST: ("already exists as a file", "pass a folder path, or move the file that is in the way"),
    errno.EACCES: ("is not accessible (permission denied)",
                   "pass a path this user may read and write, or fix its permissions"),
    errno.EPERM: ("is not accessible (operation not permitted)",
                  "pass a path this user may read and write, or fix its permissions"),
    errno.EROFS: ("is on a read-only file system", "pass a path on a writable file system"),
    errno.ENOSPC: ("cannot be written: no space left on the device", "free disk space, or pass a path on another disk"),
    errno.EDQUOT: ("cannot be written: disk quota exceeded", "free space within the quota, or pass another path"),
}


def os_error_line(e: OSError) -> str:
    """One line for an OSError: the path, what is wrong with it and the fix (`problem. Fix: fix`)."""
    from pipeline.io.lake import s3_error  # pyarrow: only when needed (the CLI starts light)

    translated = s3_error(e)
    if translated is not None:
        return str(translated)
    path = e.filename
    if path is None and e.strerror:  # pyarrow names the path inside its message: "Cannot ... '/x/y'. Detail: ..."
        quoted = re.search(r"'([^']+)'", e.strerror)
        path = quoted.group(1) if quoted else None
    if e.errno in _OS_FIXES:
        what, fix = _OS_FIXES[e.errno]
        where = f"path {path}" if path is not None else "a path"
        if e.filename2 is not None:
            where += f" (or {e.filename2})"
        return str(DataError(f"{where} {what}", fix))
    text = e.strerror or str(e) or type(e).__name__
    if path is not None and str(path) not in text:
        text = f"{text}: {path}"
    return str(DataError(f"input/output error: {text}",
                         "check the path, the disk and the network, then re-run (-v shows the details)"))


# -- pydantic: one line per invalid field, with the fix ---------------------------------------------------------

_DETAIL = re.compile(r", (?=unable|input|invalid|got|expected)")  # "a valid integer, unable to parse ..."
_COMPARE = {"greater_than_equal": ("ge", ">=", "to {} or more"), "greater_than": ("gt", ">", "above {}"),
            "less_than_equal": ("le", "<=", "to {} or less"), "less_than": ("lt", "<", "below {}")}


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """The option strings of one sub-command (to say which flag sets a field): each option string to itself, and
    `--<dest>` to the option that sets that job field under another name (`train --architecture` sets `model`)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            options = action.choices[command]._option_string_actions
            flags = {o: o for o in options}
            for o, a in options.items():
                flags.setdefault(f"--{a.dest.replace('_', '-')}", o)
            return flags
    return {}


def _model_named(title: str) -> type[BaseModel] | None:
    """The pydantic model class a ValidationError is about (its title is the class name)."""
    stack: list[type[BaseModel]] = [BaseModel]
    while stack:
        cls = stack.pop()
        if cls.__name__ == title and cls is not BaseModel:
            return cls
        stack.extend(cls.__subclasses__())
    return None


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # Optional[Model], Model | None
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def known_keys(title: str, loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys allowed next to the last element of `loc` in the model named `title` (None: not found)."""
    model = _model_named(title)
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
    return sorted(model.model_fields) if model is not None else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validation_lines(err: ValidationError, flags: Collection[str] = ()) -> list[str]:
    """One `field: problem. Fix: fix` line per error of a pydantic ValidationError (no documentation URLs).

    `flags`: the sub-command's options (or `_flags`' mapping), to name the flag or --config key that sets a field."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        field = ".".join(str(p) for p in loc) or "config"
        flag = f"--{field.replace('_', '-')}" if len(loc) == 1 else None
        if isinstance(flags, Mapping) and flag in flags:
            flag = flags[flag]  # the option that sets this field (train: --architecture sets `model`)
        places = [p for p in (flag if flag in flags else None, "--config" if "--config" in flags else None) if p]
        where = f" ({' or '.join(places)})" if places else ""
        kind, msg, ctx = e["type"], str(e["msg"]), e.get("ctx") or {}
        got = f" (got {_shown(e['input'])})" if "input" in e and kind not in ("missing", "extra_forbidden") else ""
        if kind == "missing":
            problem, fix = "required but not given", f"set {field}{where}"
        elif kind == "extra_forbidden":
            keys = known_keys(err.title, loc)
            problem = "unknown key"
            fix = "remove it" + (" from --config" if "--config" in flags else "") + \
                  (f" (known keys: {', '.join(keys)})" if keys else "")
        elif kind in _COMPARE:
            name, op, phrase = _COMPARE[kind]
            bound = ctx.get(name)
            problem, fix = f"must be {op} {bound}{got}", f"set {field} {phrase.format(bound)}{where}"
        elif kind in ("value_error", "assertion_error") and isinstance(ctx.get("error"), DataError):
            cause: DataError = ctx["error"]
            problem, fix = cause.problem, cause.fix
        elif kind in ("value_error", "assertion_error"):
            problem = re.sub(r"^(Value|Assertion) error, ", "", msg) + got
            fix = f"correct {field}{where}"
        elif msg.startswith("Input should be "):
            expected = msg.removeprefix("Input should be ")
            problem, fix = f"must be {expected}{got}", f"set {field} to {_DETAIL.split(expected)[0]}{where}"
        else:
            problem, fix = msg[:1].lower() + msg[1:] + got, f"correct {field}{where}"
        lines.append(f"{field}: {DataError(problem, fix)}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
