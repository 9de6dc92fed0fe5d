"""`python -m lmforge.serve MODEL [--port 8000] [key=value ...]`: the `lmforge serve` verb, until cli.py wires it."""
from __future__ import annotations

import sys

from ..config import format_help, load_config
from ..errors import LmforgeError
from .config import ServeConfig, run_serve


def main(argv: list[str] | None = None) -> int:
    from ..cli import split_args

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(f"lmforge serve: OpenAI-compatible server\n\n{format_help(ServeConfig)}")
        return 0
    try:
        config, overrides = split_args(argv, "model", ServeConfig)
        run_serve(load_config(ServeConfig, config, overrides))
    except LmforgeError as e:
        print(f"lmforge serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
