"""Decode kernels in Triton (paged attention, one-row GEMV, the greedy step's end) and `decode_fusion`, which
installs them on a model the engine serves. Each `*_kernel.py` holds the jitted code, imported on first use (triton
reads TRITON_INTERPRET when it is imported); its wrapper module decides when it runs."""
