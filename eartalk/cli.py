"""`eartalk` console command: one subcommand per module in ``eartalk.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``eartalk --help`` stays fast and a heavy
dependency of one command never breaks another.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> module under eartalk.commands (order = order in --help)
COMMANDS = {
    "demo": "demo",
    "synth": "synth",
    "import": "import_videos",
    "train": "train",
    "generate": "generate",
    "stream": "stream",
    "eval": "evaluate",
    "export": "export",
    "calibrate": "calibrate",
}


def _available() -> dict[str, str]:
    return {n: m for n, m in COMMANDS.items()
            if importlib.util.find_spec(f"eartalk.commands.{m}") is not None}


def _top_parser(cmds: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eartalk",
        description="Real-time talking heads: one portrait and live speech in, a lip-synced video out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `eartalk COMMAND --help` for a command's options.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in cmds.items():
        sub.add_parser(name, help=_help_of(mod), add_help=False)
    return p


def _help_of(mod: str) -> str:
    try:
        return importlib.import_module(f"eartalk.commands.{mod}").HELP
    except Exception as e:  # a broken command must not hide the others
        return f"(unavailable: {e})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = _available()
    if not argv or argv[0].startswith("-") or argv[0] not in cmds:
        parser = _top_parser(cmds)
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; expected one of {', '.join(cmds)}")
        parser.parse_args(argv or ["--help"])
        return 0
    name = argv[0]
    mod = importlib.import_module(f"eartalk.commands.{cmds[name]}")
    parser = argparse.ArgumentParser(prog=f"eartalk {name}", description=getattr(mod, "DESCRIPTION", mod.HELP),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as e:
        print(f"eartalk {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
