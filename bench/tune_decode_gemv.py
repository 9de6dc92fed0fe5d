"""Tune the GEMV tile configs inside the captured batch-1 decode step, where they run; write a config file.

Triton's autotuner times each kernel alone. Inside the decode step the GEMVs run under programmatic dependent
launch: each one's programs start while the previous kernel drains and load their first weight tile before waiting,
so the config that wins alone is not the one that wins in the step (H100, Llama-3.2-1B: the down projection's
autotuned (2, 1024, 4 warps, 1 stage) vs (8, 1024, 8 warps, 3 stages), ~38 µs per token apart). This script builds
the engine at batch 1 (compile + CUDA graphs), records the GEMV kinds the decode step launches, and tunes them by
coordinate descent: for each kind, each candidate config is tried by re-capturing the step and timing its replays;
a candidate is kept when the step gets faster by more than `--min-gain`. `--rounds` passes over the kinds. It
starts from the autotuner's choices (a shipped file for this GPU is ignored while tuning), or from `--start FILE`.

Output (`--out`): {"device", "configs": {kind: [BLOCK_N, BLOCK_K, num_warps, num_stages]}, "replay_us_before",
"replay_us_after", "trials"}. `lmforge.infer.kernels.gemv` reads it from `src/lmforge/infer/kernels/gemv_configs/<GPU name>.json`
(ship it there) or from the path in `engine.kernels.gemv_configs`.

    python bench/tune_decode_gemv.py --out configs.json                 # Llama-3.2-1B-shaped random weights
    python bench/tune_decode_gemv.py --model path/to/hf_checkpoint --out configs.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Triton's autotune list (lmforge.infer.kernels.gemv_kernel.CONFIGS) plus deeper tiles and pipelines that only pay off
# inside the step, where a GEMV's programs start early and prefetch
CANDIDATES = [(2, 1024, 4, 1), (2, 1024, 8, 1), (2, 1024, 8, 3), (2, 512, 4, 1), (4, 512, 4, 1), (4, 512, 4, 3),
              (8, 512, 4, 1), (8, 512, 8, 1), (2, 2048, 4, 1), (4, 2048, 4, 1), (8, 2048, 8, 1), (4, 1024, 8, 3),
              (8, 1024, 8, 3), (8, 1024, 4, 3), (16, 1024, 8, 3), (16, 512, 8, 3), (2, 2048, 8, 1), (4, 2048, 8, 1),
              (8, 2048, 4, 1), (16, 2048, 8, 1), (4, 4096, 8, 1), (8, 4096, 8, 1)]
# the row-walking kernel (fifth field: programs per SM; the K tile covers the row): input prepared once per program
ROW_WALKERS = [(2, 2048, 4, 1, 4), (2, 2048, 4, 1, 8), (2, 2048, 4, 1, 16), (4, 2048, 4, 1, 4), (4, 2048, 4, 1, 8),
               (4, 2048, 8, 1, 4), (8, 2048, 8, 1, 2), (8, 2048, 8, 1, 4), (2, 8192, 8, 1, 2), (2, 8192, 8, 1, 4),
               (4, 8192, 8, 1, 2)]


def fits(kind: str, config: tuple) -> bool:
    """A candidate whose K tile is not wider than the kind's K (the rest would load masked zeros); for the
    row-walking kernel, one K tile covering the row."""
    K = int(kind.split("+")[0].split("x")[1])
    if len(config) == 5 and config[4]:
        return K <= config[1] < 2 * K
    return config[1] <= max(K, 64)


def coordinate_descent(kinds: list[str], candidates: list[tuple], measure: Callable[[dict], float], rounds: int = 1,
                       min_gain: float = 0.003, log: Callable[[dict], None] = print,
                       start: dict | None = None) -> tuple[dict, float, list]:
    """Per kind in turn, the candidate that makes `measure(configs)` (µs, lower is better) smallest, keeping the
    other kinds' choices; a change is kept only when it gains more than `min_gain` (a fraction: timing noise).
    Returns (configs, best µs, trials). `start` (default {}: every kind autotuned) is where the search begins."""
    best: dict = {kind: tuple(cfg) for kind, cfg in (start or {}).items() if kind in kinds}
    best_us = measure(best)
    trials = [{"configs": {kind: list(cfg) for kind, cfg in best.items()}, "us": best_us}]
    log({"start_us": best_us})
    for _ in range(rounds):
        for kind in kinds:
            for cand in candidates:
                if not fits(kind, cand) or best.get(kind) == tuple(cand):
                    continue
                trial = {**best, kind: tuple(cand)}
                us = measure(trial)
                trials.append({"kind": kind, "config": list(cand), "us": us})
                log(trials[-1])
                if us < best_us * (1 - min_gain):
                    best, best_us = trial, us
    return best, best_us, trials


class DecodeStep:
    """The engine's captured batch-1 greedy decode step, re-captured with given GEMV configs and timed."""

    def __init__(self, model, prompt_len: int = 128, new_tokens: int = 512, replays: int = 320):
        from lmforge.infer import LLM, EngineConfig, SamplingParams
        from lmforge.infer.kernels.options import KernelOptions

        # tune from the autotuner's choices, not a shipped file's (os.devnull holds no configs)
        cfg = EngineConfig(max_model_len=prompt_len + new_tokens + 16, max_num_seqs=1, block_size=16,
                           decode_steps=16, compile=True, enable_prefix_caching=False,
                           kernels=KernelOptions(gemv_configs=os.devnull))
        self.llm = LLM(model, config=cfg)
        self.prompt = [list(range(1, prompt_len + 1))]
        self.params = SamplingParams(temperature=0, max_new_tokens=64, ignore_eos=True)
        self.replays = replays

    def kinds(self) -> list[str]:
        """The GEMV kinds one decode step launches, in launch order (recorded while capturing it)."""
        from lmforge.infer.kernels import gemv

        seen: list[str] = []

        class Recorder(dict):
            def get(self, kind, default=None):
                if kind not in seen:
                    seen.append(kind)
                return super().get(kind, default)

        saved, gemv.config_overrides = gemv.config_overrides, Recorder()
        try:
            self._capture()
        finally:
            gemv.config_overrides = saved
        return seen

    def _capture(self) -> None:
        runner = self.llm.engine.runner
        runner.graphs.clear()
        runner._greedy_run = None
        self.llm.generate(self.prompt, self.params)

    def __call__(self, configs: dict) -> float:
        """µs per replay of the step captured with `configs` (best of 5 runs of `replays` replays)."""
        from lmforge.infer.kernels import gemv

        gemv.config_overrides.clear()
        gemv.config_overrides.update(configs)
        try:
            self._capture()
        finally:
            gemv.config_overrides.clear()
        graph = next(g for key, g in self.llm.engine.runner.graphs.items() if key[3])  # the greedy graph
        step = graph.inputs["step"]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            start.record()
            for i in range(self.replays):
                if i % 16 == 0:
                    step.zero_()  # a greedy step advances its counter: keep its writes in bounds
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) * 1000 / self.replays)
        return round(best, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an HF checkpoint directory (default: Llama-3.2-1B-shaped random weights)")
    ap.add_argument("--out", required=True, help="the config file to write")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--min-gain", type=float, default=0.003)
    ap.add_argument("--start", help="a config file to start from (refine it) instead of the autotuner's choices")
    ap.add_argument("--candidates", choices=["all", "tiles", "walkers"], default="all",
                    help="tiles: one program per row block only; walkers: the row-walking kernel only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_decode_gemv.py times the captured decode step: it needs a CUDA device")
    import serve_throughput as st
    from lmforge.infer.kernels import gemv
    from lmforge.models import load_hf

    path = args.model
    if path is None:
        path = Path(tempfile.mkdtemp()) / "llama-3.2-1b"
        st.write_checkpoint("llama-3.2-1b", path, torch.bfloat16, {})
    model = load_hf(path, dtype=torch.bfloat16, device="cuda", progress=False)
    t0 = time.perf_counter()
    step = DecodeStep(model)
    kinds = step.kinds()
    print(json.dumps({"kinds": kinds}), flush=True)
    log = lambda row: print(json.dumps(row), flush=True)  # noqa: E731
    start = gemv.load_configs(Path(args.start)) if args.start else None
    candidates = {"all": CANDIDATES + ROW_WALKERS, "tiles": CANDIDATES, "walkers": ROW_WALKERS}[args.candidates]
    configs, after, trials = coordinate_descent(kinds, candidates, step, args.rounds, args.min_gain, log, start)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "configs": {kind: list(cfg) for kind, cfg in configs.items()},
              "replay_us_before": trials[0]["us"], "replay_us_after": after,
              "tuning_s": round(time.perf_counter() - t0, 1), "trials": trials}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "trials"}), flush=True)


if __name__ == "__main__":
    main()
