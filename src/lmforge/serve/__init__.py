"""OpenAI-compatible serving: `create_app(AsyncEngine, tokenizer, name)` and `run_serve(ServeConfig)`."""
from .app import create_app
from .config import ServeConfig, build_server, run_serve

__all__ = ["create_app", "ServeConfig", "build_server", "run_serve"]
