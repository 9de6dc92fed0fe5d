"""`python -m lmforge.rag index DOCS_DIR --store DIR` / `... ask QUESTION --store DIR`: `lmforge rag`."""
import sys

from .cli import main

sys.exit(main())
