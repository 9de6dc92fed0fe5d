"""`python -m lmforge.serve MODEL [--port 8000] [key=value ...]`: the same as `lmforge serve`."""
from __future__ import annotations

import sys

from ..args import report_errors, split_args
from ..config import format_help, load_config
from .config import ServeConfig, run_serve


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if "-h" in argv or "--help" in argv:
        print(f"lmforge serve: OpenAI-compatible server\n\n{format_help(ServeConfig)}")
        return 0

    def body() -> None:
        config, overrides = split_args(argv, "model", ServeConfig)
        run_serve(load_config(ServeConfig, config, overrides))

    return report_errors("lmforge serve", body, debug)


if __name__ == "__main__":
    sys.exit(main())
