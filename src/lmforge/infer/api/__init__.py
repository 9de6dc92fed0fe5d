"""What callers use: `generate()`, `LLM`, `ChatSession`, `AsyncEngine` and the output types (re-exported by
`lmforge.infer`)."""
