"""Shared fixtures: tiny random Hugging Face models written by `transformers` itself (the reference)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Without a GPU, the Triton kernels (paged decode attention, GEMV) run in Triton's CPU interpreter, which triton
# chooses when it is first imported: set it before any test module (or a library it imports) loads triton.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmforge.testing import TINY_HF_CONFIGS, make_tiny_hf_model


@pytest.fixture(params=sorted(TINY_HF_CONFIGS))
def arch(request) -> str:
    return request.param


@pytest.fixture
def tiny_hf(arch, tmp_path):
    """(transformers model, checkpoint dir) for `arch`, with randomized norms/biases so they are really tested."""
    torch.manual_seed(0)
    model = make_tiny_hf_model(arch, tmp_path / arch)
    return model, tmp_path / arch


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models run as
    fast, and do not stall when other jobs oversubscribe the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def serve():
    """Start servers for a test module: `serve(ServeConfig)` → (base url, AsyncEngine): `lmforge serve`'s app on a
    real uvicorn on 127.0.0.1 (a free port, a daemon thread); stopped, engine shut down, when the module ends."""
    pytest.importorskip("uvicorn")
    from lmforge.serve import build_server
    from lmforge.testing import serve_in_thread

    running = []

    def start(cfg):
        app, engine = build_server(cfg)
        url, stop = serve_in_thread(app, keep_alive=cfg.timeout_keep_alive)
        running.append((stop, engine))
        return url, engine

    yield start
    for stop, engine in running:
        stop()
        engine.shutdown()
