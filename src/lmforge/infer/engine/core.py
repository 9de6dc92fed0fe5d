"""The serving engine: requests in, token/text deltas out, one `step()` at a time.

Each step asks the scheduler for work (continuous batching over a paged KV cache with prefix caching and
preemption), runs the decode rows (a CUDA graph on GPU) and the prefill chunks, samples every request with its own
parameters, and applies the stop rules of `generate()` (eos and stop ids, stop strings held back while they may
still match, max tokens) plus a JSON-object constraint. When every running request is decoding and nothing is
waiting for a slot, a step runs up to `decode_steps` decode iterations back to back on the device (tokens fed
straight back, one host sync at the end); tokens past a stop are discarded. When those rows sample greedily (the
argmax inside the CUDA graph), the next such run is launched before the current one is read (run-ahead), so the
GPU keeps decoding while the host reads tokens, applies stop rules and streams text; a request that stopped or
was aborted meanwhile just has its run-ahead tokens dropped.

One bad request never takes the batch down: a step commits nothing (no computed-token counts, no emitted tokens)
until its forwards and sampling have succeeded, so when they raise, the step's requests are probed by halves
(`_isolate`) to find the ones whose work fails on its own; those end with an error output (finish_reason "error")
and their blocks are freed, the others simply run again in the next step. Per-request host work after that (stop
rules, detokenization, the JSON automaton) fails only its own request. A failure no request can be blamed for is
raised: the engine itself is broken.

`step()` returns `Completion`s (`lmforge.infer.api.outputs`, the one output type): a running request's carry that
step's deltas, a finished one's the totals too. `LLM` (offline) and the server (`lmforge.serve`) both drive this
class; it is not thread-safe (the server runs it on one background thread).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from ...config import Section
from ...errors import ConfigError, LmforgeError
from ...models.transformer import Transformer
from ...quant.base import set_kernels
from ...quant.linear import prepare_fast_path
from ..api.outputs import Completion, TokenLogprob
from ..kernels.decode_fusion import pack_for_decode
from ..kernels.options import KernelOptions
from ..sampling.batch import BatchSampler
from ..sampling.json_constraint import JsonObjectConstraint
from ..sampling.logits import SamplingParams
from ..sampling.stops import StopText
from .model_runner import ModelRunner, kv_cache_blocks
from .multi_lora import AdapterSet
from .paged_cache import BlockPool
from .scheduler import FINISHED, RUNNING, Request, Scheduled, Scheduler

log = logging.getLogger("lmforge.engine")


class EngineConfig(Section):
    """Capacity and batching of the serving engine."""

    block_size: int = Field(16, ge=1)
    """Tokens per KV-cache block (the unit of allocation and of prefix sharing)."""
    num_blocks: int | None = Field(None, ge=2)
    """KV-cache blocks; None sizes the pool from gpu_memory_utilization (CUDA) or cpu_kv_cache_gb (CPU)."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Share of the GPU's memory the process may use in all (weights, working memory, KV cache)."""
    cpu_kv_cache_gb: float = Field(2.0, gt=0)
    """KV-cache size on CPU, in GiB."""
    max_model_len: int | None = Field(None, ge=2)
    """Longest prompt + output per request; None = the model's max_seq_len."""
    max_num_seqs: int = Field(256, ge=1)
    """Most requests running at once."""
    max_num_batched_tokens: int = Field(4096, ge=1)
    """Token budget of one step (decodes count 1 each); longer prompts are prefilled in chunks."""
    enable_prefix_caching: bool = True
    """Reuse the K/V of full blocks whose prefix (hashed, verified by token ids) was computed before."""
    decode_steps: int = Field(8, ge=1)
    """Decode iterations per step when only decodes are running (no host sync between them)."""
    cuda_graphs: bool = True
    """Replay decode steps as CUDA graphs (one per batch/context bucket; CUDA only)."""
    fast_decode: bool = True
    """Pack q/k/v and gate/up weights into one matmul each and run one-row matmuls through a Triton GEMV
    (lmforge.infer.kernels.decode_fusion; same weights, no extra memory). Multi-LoRA layers keep separate matmuls."""
    compile: bool = False
    """torch.compile the forward (fused kernels inside the CUDA graphs; compiles once per bucket)."""
    max_adapters: int = Field(16, ge=1)
    """Most LoRA adapters loaded at once."""
    attention: Literal["auto", "kernel", "gather"] = "auto"
    """Decode attention: the Triton paged kernel (reads K/V through the block tables), a gathered dense view +
    SDPA, or auto (the kernel on CUDA with triton, no ALiBi and a model that calls cache.attend; else gather)."""
    kernels: KernelOptions = KernelOptions()
    """Switches of the Triton decode kernels (GEMV, programmatic dependent launch, tuned GEMV configs)."""


class ContextLengthError(LmforgeError):
    """A request does not fit: prompt + max tokens exceed the model length or the KV cache."""


class Engine:
    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None,
                 adapters: dict[str, str] | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = cfg = config or EngineConfig()
        self.device = model.embed.weight.device
        self.max_model_len = cfg.max_model_len or model.cfg.max_seq_len
        if model.cfg.pos == "learned" and self.max_model_len > model.cfg.max_seq_len:
            raise ConfigError(f"max_model_len ({self.max_model_len}) exceeds the model's learned positions "
                              f"({model.cfg.max_seq_len}); lower engine.max_model_len")
        self.adapters = AdapterSet(model, cfg.max_adapters)
        for name, path in (adapters or {}).items():
            self.adapters.add(name, path)
        set_kernels(model, cfg.kernels.quant_kernels())  # quantized linears: engine.kernels.quant*
        if self.device.type == "cuda" and cfg.kernels.quant:  # INT4 / NF4 re-laid K-major for the CUDA kernels
            prepare_fast_path(model, model.embed.weight.dtype)  # a no-op where load_hf prepared them already
        if cfg.fast_decode:  # after the adapters: LoRA-wrapped projections are not packed
            pack_for_decode(model, cfg.kernels)
        num_blocks = cfg.num_blocks or kv_cache_blocks(
            model, block_size=cfg.block_size, max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, gpu_memory_utilization=cfg.gpu_memory_utilization,
            cpu_kv_cache_gb=cfg.cpu_kv_cache_gb)
        self.pool = BlockPool(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.pool, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks=num_blocks, block_size=cfg.block_size,
                                  max_model_len=self.max_model_len, max_num_seqs=cfg.max_num_seqs,
                                  cuda_graphs=cfg.cuda_graphs, compile=cfg.compile, adapters=self.adapters,
                                  attention=cfg.attention, decode_steps=cfg.decode_steps, kernels=cfg.kernels)
        self.requests: dict[str, Request] = {}
        self.counters = {"finished": 0, "aborted": 0, "failed": 0, "blocks_freed_on_abort": 0, "prompt_tokens": 0,
                         "generated_tokens": 0}
        self._pending: list[Completion] = []
        self._inflight: _Run | None = None  # a greedy decode launched ahead, read by the next step
        self._ids = itertools.count()
        self._token_texts: list[str] | None = None
        self._base_stop_ids = set(model.cfg.stop_token_ids) | set(tokenizer.stop_ids() if tokenizer else [])

    # ------------------------------------------------------------------------------------------------ requests

    def add_adapter(self, name: str, adapter_dir: str | None = None, weights: dict | None = None) -> None:
        """Load a PEFT LoRA adapter (from `adapter_dir`, or `weights` already read by `multi_lora.read_adapter`);
        requests pick it with `adapter=name`. Safe between steps while requests run: it takes a slot no request in
        flight uses."""
        busy = {r.adapter_slot for r in self.requests.values()}
        if weights is None:
            self.adapters.add(name, adapter_dir, busy)
        else:
            self.adapters.install(name, weights, busy)
        # captured decode graphs read the stacks (which may have grown) and the module tree (wrapped, unpacked)
        self.runner.graphs, self.runner._greedy_run = {}, None

    def remove_adapter(self, name: str) -> None:
        """Unload a LoRA adapter: new requests can no longer name it; requests in flight with it run to the end."""
        self.adapters.remove(name)

    def validate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 adapter: str | None = None) -> SamplingParams:
        """Check a request without queuing it (safe from any thread); raises a one-line LmforgeError."""
        params = params or SamplingParams()
        if len(prompt_ids) == 0:
            raise ConfigError("prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ContextLengthError(f"prompt ({len(prompt_ids)} tokens) + max tokens ({params.max_new_tokens}) = "
                                     f"{total} exceeds the model's context length ({self.max_model_len}); "
                                     "shorten the prompt or lower max_tokens")
        if total > self.pool.capacity_tokens:
            raise ContextLengthError(f"prompt + max tokens ({total}) exceed the KV cache ({self.pool.capacity_tokens}"
                                     " tokens); lower max_tokens or give the engine more memory")
        lo, hi = int(min(prompt_ids)), int(max(prompt_ids))  # (C loops: a server validates on its event loop)
        if lo < 0 or hi >= vocab:
            raise ConfigError(f"prompt token id {lo if lo < 0 else hi} is outside the vocabulary (0..{vocab - 1})")
        if (params.stop or params.json_object) and self.tokenizer is None:
            raise ConfigError("stop strings and JSON mode need a tokenizer: build the engine with tokenizer=...")
        if params.logprobs is not None and params.logprobs > vocab:
            raise ConfigError(f"logprobs ({params.logprobs}) exceeds the vocabulary size ({vocab})")
        self.adapters.slot(adapter)
        return params

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, adapter: str | None = None) -> str:
        """Queue a prompt (token ids); returns its request id. Outputs come from `step()`."""
        params = self.validate(prompt_ids, params, adapter)
        self.runner.ensure_cache()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ConfigError(f"request id '{request_id}' is already in use")
        prompt = [int(t) for t in prompt_ids]
        req = Request(request_id, list(prompt), params, self.adapters.cache_key(adapter), self.adapters.slot(adapter))
        if params.seed is not None and not params.greedy:
            req.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self._base_stop_ids)
        req.extra = {"prompt": prompt, "stop_ids": stop_ids, "logprobs": [],
                     "detok": StopText(self.tokenizer, params.stop) if self.tokenizer is not None else None,
                     "json": JsonObjectConstraint(self.token_texts(), params.max_new_tokens)
                     if params.json_object else None}
        self.requests[request_id] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += len(prompt_ids)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; its last output (finish_reason "abort") comes from `step()`."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        freed = self.scheduler.free(req)
        req.status, req.finish_reason = FINISHED, "abort"
        self.counters["aborted"] += 1
        self.counters["blocks_freed_on_abort"] += freed
        self._forget_finished_inflight()
        self._pending.append(self._final(req, _output(req)))
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were forgotten. Call it after the model's weights
        changed (e.g. an optimizer step between RL rollouts): cached K/V were computed with the old weights."""
        return self.pool.reset_prefix_cache()

    def release_kv_cache(self) -> None:
        """Free the KV cache's memory (and the CUDA graphs bound to it) while no request runs, e.g. for a training
        step between rollouts on one GPU; the next `add_request` allocates it again. The prefix cache is reset."""
        if self.scheduler.has_unfinished():
            raise LmforgeError("release_kv_cache needs an idle engine: requests are still running")
        self._inflight = None
        self.reset_prefix_cache()
        self.runner.release_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    def stats(self) -> dict:
        return {**self.counters, **self.scheduler.stats, **self.pool.stats, "num_blocks": self.pool.num_blocks,
                "free_blocks": self.pool.num_free, "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "cuda_graphs": len(self.runner.graphs),
                "lora_adapters": len(self.adapters.slots)}

    def token_texts(self) -> list[str]:
        """Text of every token id alone (for the JSON constraint), computed once."""
        if self._token_texts is None:
            n = self.tokenizer.vocab_size
            self._token_texts = [self.tokenizer.decode([i]) if i < n else "" for i in range(self.model.cfg.vocab_size)]
        return self._token_texts

    # ------------------------------------------------------------------------------------------------ stepping

    def _lookahead(self) -> int:
        """Decode iterations this step may run back to back (1 unless every running request is decoding and
        nobody waits for a free slot)."""
        sched, k = self.scheduler, self.config.decode_steps
        if k <= 1 or not sched.running or (sched.waiting and len(sched.running) < sched.max_num_seqs):
            return 1
        for r in sched.running:
            if r.num_tokens - r.num_computed != 1 or r.extra["json"] is not None:
                return 1
            k = min(k, r.params.max_new_tokens - r.num_generated, self.max_model_len - r.num_tokens)
        return max(k, 1)

    def _sampler(self, reqs: Sequence[Request]) -> BatchSampler:
        constraints = {i: r.extra["json"].pick for i, r in enumerate(reqs) if r.extra["json"] is not None}
        return BatchSampler(reqs, self.model.cfg.vocab_size, self.device, constraints)

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Run one scheduling step; return the outputs of every request that produced something or ended."""
        outputs, self._pending = self._pending, []
        if self._inflight is not None:  # launched by the last step: read it (launching the next one first)
            run, self._inflight = self._inflight, None
            return outputs + self._finish(run)
        k = self._lookahead()
        chunks, preempted = self.scheduler.schedule(k)
        if not chunks:
            return outputs
        if k > 1 and (preempted or not all(c.length == 1 and c.samples for c in chunks)):
            k = 1  # a multi-step decode only when every chunk is a decode and nothing was preempted
        try:
            work = self._compute(chunks, k)
        except Exception as e:  # noqa: BLE001 - nothing was committed: find who is to blame
            return outputs + self._isolate(chunks, k, e)
        if isinstance(work, _Run):
            for r in work.reqs:
                r.num_computed += k
            return outputs + self._finish(work)
        sampled, host = work
        for c in chunks:
            c.request.num_computed += c.length
        outputs += [self._emit(c.request, [host[i]]) for i, c in enumerate(sampled)]
        for c in chunks:
            if not c.samples:
                self.scheduler.cache_full_blocks(c.request)
        return outputs

    def _compute(self, chunks: list[Scheduled], k: int) -> _Run | tuple[list[Scheduled], list]:
        """A step's device work, changing no engine state (the K/V it writes are those of positions not yet counted
        as computed, so running it again is harmless): a k-step decode of every chunk (k > 1) as a `_Run`; else one
        forward of the decode rows and the prefill chunks, and the sampling of the chunks that reach their request's
        last token → (those chunks, their (token, logprobs) on the host)."""
        if k > 1:
            reqs = [c.request for c in chunks]
            return _Run(reqs, self.runner.decode(reqs, k, self._sampler(reqs)))
        decodes = [c for c in chunks if c.length == 1]
        logits, order = [], []
        if decodes:
            decode_logits = self.runner.decode([c.request for c in decodes], 1, None)[0]
            logits.append(decode_logits[[i for i, c in enumerate(decodes) if c.samples]])
            order += decodes
        for group in _prefill_groups([c for c in chunks if c.length > 1]):
            logits.append(self.runner.prefill(group))
            order += group  # keep chunk order aligned with the logits rows
        sampled = [c for c in order if c.samples]
        if not sampled:
            return sampled, []
        result = self._sampler([c.request for c in sampled])(torch.cat(logits))
        return sampled, self._host_results([result], len(sampled))[0]

    def _isolate(self, chunks: list[Scheduled], k: int, error: Exception) -> list[Completion]:
        """The work of a step raised `error`. Rerun parts of it to find the requests whose work fails on its own:
        halve the batch and keep halving the halves that fail (about 2 log2(B) probes per culprit, on this failure
        path only). The culprits end with an error; the others run again next step (nothing of the failed step was
        committed). When no part fails alone, or every request does, the fault is no request's: re-raise."""
        log.warning("engine step failed (%s: %s); probing its %d requests", type(error).__name__, error, len(chunks))
        culprits = self._blame(chunks, k, error)
        if not culprits or (len(chunks) > 1 and len(culprits) == len(chunks)):
            raise error
        return [self._fail(c.request, e) for c, e in culprits]

    def _blame(self, chunks: list[Scheduled], k: int, error: Exception) -> list[tuple[Scheduled, Exception]]:
        """(chunk, its error) for the chunks of a failed batch whose work also fails on its own."""
        if len(chunks) == 1:
            return [(chunks[0], error)]
        culprits = []
        for half in (chunks[:len(chunks) // 2], chunks[len(chunks) // 2:]):
            try:
                self._compute(half, k)
            except Exception as e:  # noqa: BLE001 - this half holds a culprit
                culprits += self._blame(half, k, e)
        return culprits

    def _fail(self, req: Request, error: Exception) -> Completion:
        """End a request whose work raised `error`: its blocks are freed, its last output carries the error."""
        log.warning("request %s failed: %s: %s", req.request_id, type(error).__name__, error)
        self.requests.pop(req.request_id, None)
        self.scheduler.free(req)
        req.status, req.finish_reason = FINISHED, "error"
        self.counters["failed"] += 1
        self._forget_finished_inflight()
        out = _output(req)
        out.error = f"{type(error).__name__}: {error}"
        try:
            return self._final(req, out)
        except Exception:  # noqa: BLE001 - its detokenizer is what broke: report without the text
            out.finish_reason = "error"
            return out

    def _finish(self, run: _Run) -> list[Completion]:
        """Read a multi-step decode and apply the stop rules, after launching the next greedy run of the same rows
        when nothing else could use the step (see `_run_ahead`)."""
        self._inflight = self._run_ahead(run)
        per_step = self._host_results(run.results, len(run.reqs), run.tokens.get())
        outputs = [self._emit(r, [s[i] for s in per_step]) for i, r in enumerate(run.reqs)
                   if r.status != FINISHED]  # (aborted since the launch: its last output is already pending)
        self._forget_finished_inflight()
        return outputs

    def _forget_finished_inflight(self) -> None:
        """Drop the run launched ahead once all its rows have stopped or been aborted: nothing left to read."""
        if self._inflight is not None and all(r.status == FINISHED for r in self._inflight.reqs):
            self._inflight = None

    def _run_ahead(self, run: _Run) -> _Run | None:
        """Launch the next `decode_steps` greedy decode steps of `run`'s rows before reading `run`: only when it
        was a greedy-graph run (`ModelRunner.continue_greedy`), its rows are all of the running requests, nobody
        waits for a free slot, and every row has room for more tokens even if `run` stops none of them. The
        positions count from num_computed, which already includes `run`."""
        sched, k = self.scheduler, self.config.decode_steps
        if sched.waiting and len(sched.running) < sched.max_num_seqs:
            return None
        if len(run.reqs) != len(sched.running) or any(r.status != RUNNING for r in run.reqs):
            return None
        for r in run.reqs:  # num_tokens / num_generated do not count run's tokens yet
            k = min(k, r.params.max_new_tokens - r.num_generated - run.steps,
                    self.max_model_len - r.num_tokens - run.steps)
        if k < 1 or not self.runner.continues(run.reqs) or not sched.reserve_decodes(run.reqs, k):
            return None
        results = self.runner.continue_greedy(run.reqs, k)
        if results is None:
            return None
        for r in run.reqs:
            r.num_computed += k
        return _Run(run.reqs, results)

    def _host_results(self, results: list, n: int, tokens: list[list[int]] | None = None
                      ) -> list[list[tuple[int, TokenLogprob | None]]]:
        """Per step, per row (token, logprobs) on the host: one device-to-host read per field for all the steps
        (`tokens` (steps, n): already read)."""
        if tokens is None:
            tokens = torch.stack([r.tokens for r in results]).tolist()  # (steps, n)
        if results[0].logprob is None:
            return [[(t, None) for t in row] for row in tokens]
        chosen = torch.stack([r.logprob for r in results]).tolist()
        if results[0].top_ids is not None:
            ids = torch.stack([r.top_ids for r in results]).tolist()
            values = torch.stack([r.top_logprobs for r in results]).tolist()
            tops = [[list(zip(i, v)) for i, v in zip(si, sv)] for si, sv in zip(ids, values)]
        else:
            tops = [[[] for _ in range(n)] for _ in results]
        return [[(t, TokenLogprob(t, lp, top)) for t, lp, top in zip(*step)] for step in zip(tokens, chosen, tops)]

    def _emit(self, req: Request, sampled: list[tuple[int, TokenLogprob | None]]) -> Completion:
        """Apply stop rules to the sampled tokens of one request (discarding any after a stop); an exception in
        this per-request work (detokenizer, JSON automaton) fails that request alone."""
        try:
            return self._emit_tokens(req, sampled)
        except Exception as e:  # noqa: BLE001
            return self._fail(req, e)

    def _emit_tokens(self, req: Request, sampled: list[tuple[int, TokenLogprob | None]]) -> Completion:
        out = _output(req)
        ex = req.extra
        reason = None
        for token, lp in sampled:
            if token in ex["stop_ids"]:
                reason = "stop"
                break
            req.token_ids.append(token)
            out.new_token_ids.append(token)
            self.counters["generated_tokens"] += 1
            if lp is not None and req.params.logprobs is not None:
                out.new_logprobs.append(lp)
                ex["logprobs"].append(lp)
            if ex["json"] is not None:
                ex["json"].accept(token)
            if ex["detok"] is not None:
                piece, hit = ex["detok"].push(token)
                out.new_text += piece
                if hit:
                    reason = "stop"
                    break
            if ex["json"] is not None and ex["json"].done:
                reason = "stop"
                break
            if req.num_generated >= req.params.max_new_tokens or req.num_tokens >= self.max_model_len:
                reason = "length"
                break
        self.scheduler.cache_full_blocks(req)
        if reason is not None:
            req.finish_reason = reason
            self.scheduler.free(req)
            req.status = FINISHED
            self.requests.pop(req.request_id, None)
            self.counters["finished"] += 1
            return self._final(req, out)
        return out

    def _final(self, req: Request, out: Completion) -> Completion:
        detok = req.extra.get("detok")
        if detok is not None:
            out.new_text += detok.flush()  # text held back for a stop string that never came
        out.finish_reason = req.finish_reason
        out.token_ids = req.output_ids
        out.text = detok.text if detok is not None else None
        out.logprobs = req.extra.get("logprobs") if req.params.logprobs is not None else None
        return out


def _output(req: Request) -> Completion:
    """A step's output for `req`: its deltas go in as the step runs; `Engine._final` adds the totals."""
    return Completion(req.extra["prompt"], None, None, request_id=req.request_id)


class _Run:
    """A launched multi-step decode: its rows, its per-step results on the device, and their tokens on their way
    to the host (copied right behind the run, so reading them waits for this run only, not one launched after)."""

    def __init__(self, reqs: list[Request], results: list):
        self.reqs, self.results, self.steps = reqs, results, len(results)
        self.tokens = _TokensToHost(torch.stack([r.tokens for r in results]))


class _TokensToHost:
    """A device tensor copied to the host behind the work queued so far: pinned memory and an event on CUDA."""

    def __init__(self, x: torch.Tensor):
        if x.is_cuda:
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self.host.copy_(x, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = x.clone(), None

    def get(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def _prefill_groups(chunks: list[Scheduled], waste: float = 1.5) -> list[list[Scheduled]]:
    """Split prefill chunks into forwards whose right padding stays under `waste` x the real tokens."""
    groups: list[list[Scheduled]] = []
    total = 0
    for c in sorted(chunks, key=lambda c: -c.length):
        if groups and (len(groups[-1]) + 1) * groups[-1][0].length <= waste * (total + c.length):
            groups[-1].append(c)
            total += c.length
        else:
            groups.append([c])
            total = c.length
    return groups
