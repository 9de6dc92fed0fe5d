"""Runs the model over the paged cache: prefill chunks, decode steps (replayed as CUDA graphs), KV pool sizing.

A prefill forward takes rows of new tokens, right-padded to the longest; a decode forward takes one token per row.
Both describe themselves to the cache with a `PagedBatch` built on the device from block tables, so the decode step
is one static-shape function of a few input buffers (tokens, start positions, block tables, adapter slots): on CUDA
it is captured once per (batch bucket, context bucket) and replayed. A multi-step decode feeds each step's sampled
tokens straight back into the buffers, with no host round trip between steps; when every row samples greedily with
no penalties or logprobs, the argmax, the feedback and the bookkeeping are inside the captured step too (a k-step
decode is k replays and one read of the (k, B) tokens), and `continue_greedy` can launch the next k steps before
that read, straight from the graph's own buffers (the engine overlaps its host work with them).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ...errors import ConfigError
from ...models.transformer import Transformer
from ..kernels.greedy_advance import greedy_advance
from ..kernels.options import DEFAULT, KernelOptions
from ..kernels.paged_attention import kernel_available, load_kernel
from ..sampling.batch import SampleResult
from .paged_cache import PagedBatch, PagedKVCache, model_calls_cache_attend, paged_batch, paged_decode_batch
from .scheduler import Request, Scheduled

log = logging.getLogger("lmforge.infer")

_BATCH_TENSORS = ("positions", "write_slots", "view_slots", "key_positions", "query_slots", "block_tables", "seq_lens",
                  "rope_cos", "rope_sin")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def _bucket(n: int, buckets: Sequence[int]) -> int:
    return next((b for b in buckets if b >= n), buckets[-1])


class ModelRunner:
    def __init__(self, model: Transformer, *, num_blocks: int, block_size: int, max_model_len: int,
                 max_num_seqs: int, cuda_graphs: bool, compile: bool = False, adapters=None,
                 attention: str = "auto", decode_steps: int = 8, kernels: KernelOptions = DEFAULT):
        self.model, self.adapters, self.kernels = model, adapters, kernels
        w = model.embed.weight
        self.device, self.dtype = w.device, w.dtype
        self.block_size, self.max_model_len, self.decode_steps = block_size, max_model_len, decode_steps
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, self.dtype, self.device, kernels)
        self.table_width = math.ceil(max_model_len / block_size) + 1
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.paged_kernel = self._use_paged_kernel(attention)
        # the decode kernels rotate q/k: the batch carries the RoPE tables (see PagedBatch.rope_cos) when the model has
        # one table; with several (Gemma 3's local and global layers) each layer hands the kernel its own
        shared = len(model.rotary) == 1 and self.paged_kernel and self.cache.kernel_rope
        self.rope = (next(iter(model.rotary.values())), self.dtype) if shared else None
        self.forward_fn = self.decode_fn = self._model_forward
        self.batch_fn = None
        if compile:  # the static-shape decode step only: prefill shapes vary too much to compile each
            self.decode_fn = torch.compile(self._model_forward, dynamic=False)
            if self.paged_kernel:  # (the gathered view's index math hit an inductor bug in torch 2.11: stays eager)
                self.batch_fn = torch.compile(self._decode_batch_tensors, dynamic=False)
            _raise_recompile_limit()
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.graphs: dict[tuple, _CapturedGraph | _EagerReplay] = {}
        self.graph_pool = self.capture_stream = None
        self.static: dict[str, torch.Tensor] = {}
        self._greedy_run: _GreedyRun | None = None  # the last decode, if a greedy graph ran it (continue_greedy)
        if self.use_graphs:
            self.enable_static_decode()

    def enable_static_decode(self) -> None:
        """Decode through fixed-size input buffers and bucketed shapes: what CUDA graphs replay. Off CUDA the
        "graph" reruns the same code eagerly on the buffers it was captured on, which lets CPU tests cover the
        bucketing and padding rows.

        Idempotent: the buffers are allocated once, because a captured graph reads (and writes) those very
        addresses on every replay; swapping them under captured graphs made replays read freed memory. `logits`
        (max batch, V) is the one output every graph writes, so graph memory does not grow with the graph count."""
        self.use_graphs = True
        if self.static:
            return
        B, dev = self.batch_buckets[-1], self.device
        long = {"dtype": torch.long, "device": dev}
        self.static = {"tokens": torch.zeros(B, **long), "starts": torch.zeros(B, **long),
                       "lengths": torch.zeros(B, **long), "tables": torch.zeros(B, self.table_width, **long),
                       "adapters": torch.zeros(B, **long),
                       "logits": torch.zeros(B, self.model.cfg.vocab_size, dtype=self.dtype, device=dev),
                       # greedy graphs: the step counter and each step's tokens, two halves of (decode_steps, B):
                       # a continued run writes one while the engine reads the other
                       "step": torch.zeros(1, **long), "sampled": torch.zeros(2 * self.decode_steps, B, **long)}

    def _use_paged_kernel(self, attention: str) -> bool:
        """Decode through the Triton paged kernel ("kernel"), the gathered view + SDPA ("gather"), or the kernel
        where it can run: CUDA, triton importable, no ALiBi, and a model whose attention calls `cache.attend`."""
        if attention == "gather" or (attention == "auto" and self.device.type != "cuda"):
            return False  # off CUDA the kernel runs only in Triton's interpreter, for tests that ask for it
        reasons = []
        if not kernel_available(self.device):
            reasons.append("triton on a CUDA device")
        unsupported = kernel_unsupported(self.model.cfg)
        reasons += [f"no {u}" for u in unsupported]
        if not reasons and not model_calls_cache_attend(self.model):
            reasons.append("the model's attention to call cache.attend (hook not wired)")
        if reasons and attention == "kernel":
            raise ConfigError(f"engine.attention=kernel needs {' and '.join(reasons)}; use attention=auto")
        if unsupported:
            log.info("paged decode kernel off for this model (it has %s): decoding through the gathered KV view + "
                     "SDPA instead", ", ".join(unsupported))
        if not reasons:
            load_kernel()  # import triton now, outside any compiled or captured region
        return not reasons

    # -------------------------------------------------------------------------------------------- building blocks

    def _decode_batch(self, tables, starts, lengths, C: int) -> PagedBatch:
        """One token per row over C context slots: the kernel's batch (no view) or the gathered view's."""
        if self.batch_fn is not None:  # compiled: one or two fused kernels instead of ~25 tiny ones per step
            values = self.batch_fn(tables, starts, lengths, C + 1)
            return PagedBatch(**dict(zip(_BATCH_TENSORS, values)), max_context=C + 1)
        if self.paged_kernel:
            return paged_decode_batch(tables, starts, lengths, self.block_size, C + 1, self.rope)
        return paged_batch(tables, starts, lengths, 1, C, self.block_size)

    def _decode_batch_tensors(self, tables, starts, lengths, max_context: int) -> tuple:
        """The kernel path's decode batch as a tuple of tensors (what the compiled function returns)."""
        batch = paged_decode_batch(tables, starts, lengths, self.block_size, max_context, self.rope)
        return tuple(getattr(batch, name) for name in _BATCH_TENSORS)

    def _model_forward(self, tokens: torch.Tensor, positions: torch.Tensor, query_slots: torch.Tensor):
        return self.model.hidden_states(tokens, positions, cache=self.cache, slots=query_slots)

    def _tables(self, reqs: Sequence[Request], width: int, pinned: bool = False) -> torch.Tensor:
        """Block tables (B, width) on the device; `pinned` stages them in pinned memory, so the copy is queued
        behind the kernels already launched instead of waiting for them."""
        rows = torch.tensor([r.blocks[:width] + [0] * (width - min(len(r.blocks), width)) for r in reqs])
        if pinned and self.device.type == "cuda":
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def _set_adapters(self, rows: torch.Tensor | None) -> None:
        if self.adapters is not None and len(self.adapters):
            self.adapters.index.rows = rows

    def _lora_rows(self, reqs: Sequence[Request]) -> torch.Tensor | None:
        if self.adapters is None or not len(self.adapters) or not any(r.adapter_slot for r in reqs):
            return None
        return torch.tensor([r.adapter_slot for r in reqs], dtype=torch.long).to(self.device, non_blocking=True)

    def _run(self, tokens, batch: PagedBatch, adapter_rows, pick=None, forward=None) -> torch.Tensor:
        """One forward; logits (n, V) at `pick` = (row index (n,), position (n,)), default each row's last position.
        `adapter_rows` (B,) are the LoRA slots of the rows (None: no adapter anywhere in the batch)."""
        self.cache.batch = batch
        self._set_adapters(adapter_rows)
        try:
            hidden = (forward or self.forward_fn)(tokens, batch.positions, batch.query_slots)  # (B, T, d)
            if pick is None:
                return self.model.logits(hidden[:, -1])
            index, last = pick
            self._set_adapters(None if adapter_rows is None else adapter_rows[index])
            return self.model.logits(hidden[index, last])
        finally:
            self._set_adapters(None)

    # -------------------------------------------------------------------------------------------- prefill

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[Scheduled]) -> torch.Tensor:
        """Compute the chunks' K/V; logits (n, V) for the chunks that end at their request's last token, in order."""
        B, T = len(chunks), max(c.length for c in chunks)
        C = max(c.start for c in chunks)
        tokens = torch.zeros(B, T, dtype=torch.long)
        for i, c in enumerate(chunks):
            tokens[i, :c.length] = torch.tensor(c.request.token_ids[c.start:c.start + c.length])
        starts = torch.tensor([c.start for c in chunks])
        lengths = torch.tensor([c.length for c in chunks])
        width = math.ceil((C + T) / self.block_size)
        to = {"device": self.device, "non_blocking": True}
        batch = paged_batch(self._tables([c.request for c in chunks], width), starts.to(**to), lengths.to(**to),
                            T, C, self.block_size)
        rows = [i for i, c in enumerate(chunks) if c.samples]
        idx = torch.tensor(rows, dtype=torch.long)
        pick = (idx.to(**to), (lengths[idx] - 1).to(**to))
        return self._run(tokens.to(**to), batch, self._lora_rows([c.request for c in chunks]), pick)

    # -------------------------------------------------------------------------------------------- decode

    @torch.inference_mode()
    def decode(self, reqs: Sequence[Request], steps: int, sample) -> list:
        """`steps` decode steps for requests whose last token is not yet computed; `sample(logits) -> result`
        with `.tokens` (B,) on the device is called after each step, and its tokens are fed to the next.
        With `sample=None` (one step) the result is [logits (B, V)], valid until the next decode."""
        if sample is None:
            steps, sample = 1, lambda logits: logits
        self._greedy_run = None  # whatever runs now overwrites the static buffers a continuation would read
        B = len(reqs)
        starts_host = [r.num_computed for r in reqs]
        tokens = torch.tensor([r.token_ids[r.num_computed] for r in reqs]).to(self.device, non_blocking=True)
        starts = torch.tensor(starts_host).to(self.device, non_blocking=True)
        adapter_rows = self._lora_rows(reqs)
        results = []
        if self.use_graphs:
            C = self._context_bucket(max(starts_host) + steps - 1, B)
            greedy = getattr(sample, "plain_greedy", False) and steps <= self.decode_steps
            graph = self._graph(_bucket(B, self.batch_buckets), C, adapter_rows is not None, greedy)
            st = graph.inputs  # the buffers this graph was captured on
            st["lengths"].zero_()
            st["lengths"][:B] = 1
            st["starts"].zero_()
            st["tables"][:B] = self._tables(reqs, self.table_width)
            st["tables"][B:].zero_()  # padding rows point at the null block, not at a finished request's blocks
            if adapter_rows is not None:
                st["adapters"][:B] = adapter_rows
            if greedy:  # the graph samples, feeds the tokens back and advances the positions itself
                st["tokens"][:B] = tokens
                st["starts"][:B] = starts
                st["step"].zero_()
                for _ in range(steps):
                    graph.replay()
                self._greedy_run = _GreedyRun(graph, list(reqs), C)
                return [SampleResult(st["sampled"][i, :B]) for i in range(steps)]
            for _ in range(steps):
                st["tokens"][:B] = tokens
                st["starts"][:B] = starts
                graph.replay()
                result = sample(graph.output[:B])
                results.append(result)
                if steps > 1:
                    tokens, starts = result.tokens, starts + 1
            return results
        width = math.ceil((max(starts_host) + steps) / self.block_size)
        tables = self._tables(reqs, width)
        lengths = torch.ones(B, dtype=torch.long, device=self.device)
        for step in range(steps):
            batch = self._decode_batch(tables, starts, lengths, max(starts_host) + step)
            result = sample(self._run(tokens[:, None], batch, adapter_rows))
            results.append(result)
            if steps > 1:
                tokens, starts = result.tokens, starts + 1
        return results

    def continues(self, reqs: Sequence[Request]) -> bool:
        """Whether the last decode was a greedy graph run over exactly these rows (`continue_greedy` may follow)."""
        return self._greedy_run is not None and self._greedy_run.reqs == list(reqs)

    @torch.inference_mode()
    def continue_greedy(self, reqs: Sequence[Request], steps: int) -> list[SampleResult] | None:
        """`steps` more greedy decode steps straight on from the last decode, if a greedy graph ran it over these
        same rows: its buffers already hold each row's newest token and position, so this only refreshes the block
        tables (the caller has grown them for the new positions, counted from each request's num_computed) and
        replays; no host read in between, so it can be launched before the previous run's tokens are read. The
        tokens land in the other half of `sampled`. None (nothing launched) when another decode ran since, the rows
        differ, or the positions leave the graph's context bucket."""
        run = self._greedy_run
        if not self.continues(reqs) or not 1 <= steps <= self.decode_steps:
            return None
        B = len(reqs)
        if self._context_bucket(max(r.num_computed for r in reqs) + steps - 1, B) != run.C:
            return None
        st = run.graph.inputs
        st["tables"][:B] = self._tables(reqs, self.table_width, pinned=True)
        run.half = 1 - run.half
        base = run.half * self.decode_steps
        st["step"].fill_(base)
        for _ in range(steps):
            run.graph.replay()
        return [SampleResult(st["sampled"][base + i, :B]) for i in range(steps)]

    def _context_bucket(self, context: int, batch: int) -> int:
        """Context slots of the decode view: the whole max_model_len for small batches (one graph, and the extra
        gather is small next to the weights), else the next power of two (>= 256), a multiple of the block size."""
        top = self.table_width * self.block_size - self.block_size
        if _bucket(batch, self.batch_buckets) * top <= 16384:
            return top
        c = 256
        while c < context:
            c *= 2
        return min(math.ceil(c / self.block_size) * self.block_size, top)

    def _decode_graph_body(self, B: int, C: int, lora: bool, greedy: bool, st: dict) -> torch.Tensor:
        width = C // self.block_size + 1
        batch = self._decode_batch(st["tables"][:B, :width], st["starts"][:B], st["lengths"][:B], C)
        logits = self._run(st["tokens"][:B, None], batch, st["adapters"][:B] if lora else None,
                           forward=self.decode_fn)
        if greedy:  # argmax → this step's row of `sampled` and the next step's input; positions advance
            greedy_advance(logits, st["sampled"][:, :B], st["step"], st["tokens"][:B], st["starts"][:B], self.kernels)
            return st["sampled"][:, :B]
        # every graph writes the one output buffer: its own logits are a temporary of the shared graph pool, reused
        # by the next capture, instead of a tensor each graph keeps alive
        return st["logits"][:B].copy_(logits)

    @torch.inference_mode()
    def _graph(self, B: int, C: int, lora: bool, greedy: bool = False):
        """The decode graph of (batch bucket, context bucket, LoRA, greedy), captured on first use. Always under
        inference mode: with autograd on (capture() called from plain code), each captured output held the forward's
        autograd graph, i.e. every layer's gathered K/V view, for good (tens of GiB at 256 x 2048)."""
        key = (B, C, lora, greedy)
        if key in self.graphs:
            return self.graphs[key]
        self._greedy_run = None  # capturing resets the buffers
        st = self.static
        for name in ("tokens", "starts", "lengths", "adapters", "step"):  # capture on padding rows: writes hit block 0
            st[name].zero_()

        def body() -> torch.Tensor:  # bound to these buffers for good, as the captured graph is
            return self._decode_graph_body(B, C, lora, greedy, st)

        if self.device.type != "cuda":
            self.graphs[key] = _EagerReplay(body, st)
            return self.graphs[key]
        if self.graph_pool is None:  # one pool and one warm-up stream for every graph (replays never overlap)
            self.graph_pool, self.capture_stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
        stream = self.capture_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                st["step"].zero_()  # a greedy step advances the counter; keep the warm-up's writes in bounds
                body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.graph_pool):
            logits = body()
        self.graphs[key] = _CapturedGraph(graph, logits, st)
        return self.graphs[key]

    def release_cache(self) -> None:
        """Free the K/V pools and every graph captured on them (their addresses die with them); `ensure_cache`
        allocates both again on the next use."""
        self.graphs.clear()
        self._greedy_run = None
        self.graph_pool = None
        self.cache.k, self.cache.v = self.cache.k.new_empty(0), self.cache.v.new_empty(0)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def ensure_cache(self) -> None:
        """Allocate the K/V pools again after `release_cache` (zeros, the shapes they had)."""
        if self.cache.k.numel() == 0:
            fresh = PagedKVCache(self.model.cfg, self.cache.num_blocks, self.block_size, self.dtype, self.device,
                                 self.kernels)
            self.cache.k, self.cache.v = fresh.k, fresh.v

    @torch.inference_mode()
    def capture(self, batch_sizes: Sequence[int] | None = None, contexts: Sequence[int] | None = None) -> int:
        """Capture decode graphs ahead of time (largest first, so smaller ones reuse their memory); returns how many
        distinct graphs the plan covers. Memory: one shared graph pool (the largest step's working set) plus one
        (max batch, V) logits buffer, whatever the number of graphs."""
        if not self.use_graphs:
            return 0
        keys = []
        for B in sorted({_bucket(b, self.batch_buckets) for b in batch_sizes or self.batch_buckets}, reverse=True):
            for C in sorted({self._context_bucket(c, B) for c in (contexts or [self.max_model_len])}, reverse=True):
                self._graph(B, C, False)
                keys.append((B, C))
        return len(keys)


def kernel_unsupported(cfg) -> list[str]:
    """Attention features of `cfg` the paged decode kernel does not compute. Such a model still runs in the engine:
    its decode steps attend over the gathered view of its blocks with the model's own attention (same results)."""
    out = []
    if cfg.pos == "alibi":
        out.append("ALiBi")
    if cfg.attention == "mla":
        out.append("multi-head latent attention (the pool holds latents, expanded by the model)")
    if cfg.attn_sinks:
        out.append("attention sinks")
    if cfg.attn_chunk is not None:
        out.append("chunked attention")
    return out


class _GreedyRun:
    """What `continue_greedy` extends: the greedy graph that ran the last decode, its rows and context bucket, and
    which half of `sampled` the latest run wrote."""

    def __init__(self, graph, reqs: list[Request], C: int):
        self.graph, self.reqs, self.C, self.half = graph, reqs, C, 0


class _CapturedGraph:
    """A captured decode step; `replay()` refills `output` (logits (B, V), a view of the shared buffer) from
    `inputs`, the static buffers it was captured on (the only ones it reads)."""

    def __init__(self, graph, output: torch.Tensor, inputs: dict[str, torch.Tensor]):
        self.graph, self.output, self.inputs = graph, output, inputs

    def replay(self) -> None:
        self.graph.replay()


class _EagerReplay:
    """Stands in for a CUDA graph off CUDA, with its semantics: it runs once when "captured" (on padding rows),
    and `replay()` reruns the function on the buffers it was captured on; `output` is its latest result."""

    def __init__(self, fn, inputs: dict[str, torch.Tensor]):
        self.fn, self.inputs = fn, inputs
        self.output = fn()

    def replay(self) -> None:
        self.output = self.fn()


def _raise_recompile_limit(limit: int = 256) -> None:
    """Each decode bucket is a static shape; let dynamo keep one compiled graph per bucket."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def kv_cache_blocks(model: Transformer, *, block_size: int, max_model_len: int, max_num_seqs: int,
                    max_num_batched_tokens: int, gpu_memory_utilization: float, cpu_kv_cache_gb: float) -> int:
    """How many KV blocks fit: on CUDA, free memory after the weights, minus (1 - gpu_memory_utilization) of the
    device and the working memory of the largest prefill, decode view and sampler; on CPU, `cpu_kv_cache_gb`.
    Never more than max_num_seqs full-length sequences need."""
    cfg = model.cfg
    w = model.embed.weight
    per_block = PagedKVCache.bytes_per_block(cfg, block_size, w.dtype)
    wanted = max_num_seqs * math.ceil(max_model_len / block_size) + 1
    if w.device.type != "cuda":
        return max(2, min(wanted, int(cpu_kv_cache_gb * 2**30) // per_block))
    torch.cuda.synchronize(w.device)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(w.device)
    peak = _profile_prefill(model, max_num_batched_tokens, block_size)
    token_bytes = per_block // (block_size * cfg.n_layers)  # K+V of one token in one layer
    # one layer's gathered K and V views of a full decode batch with the index_select temporaries and the SDPA mask,
    # twice: a capture's eager warm-up (regular pool) while the shared graph pool holds its own working set
    decode_view = 4 * max_num_seqs * min(max_model_len, 4096) * token_bytes
    graph_logits = max_num_seqs * cfg.vocab_size * w.element_size()  # the one output buffer all decode graphs share
    sampler = 6 * max_num_seqs * cfg.vocab_size * 4
    budget = free - (1 - gpu_memory_utilization) * total - peak - decode_view - graph_logits - sampler
    if budget < 2 * per_block:
        working = peak + decode_view + graph_logits + sampler
        raise MemoryError(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free, working memory "
                          f"{working / 2**30:.1f} GiB); raise gpu_memory_utilization or "
                          "lower max_num_seqs / max_num_batched_tokens")
    return max(2, min(wanted, int(budget // per_block)))


@torch.inference_mode()
def _profile_prefill(model: Transformer, tokens: int, block_size: int) -> int:
    """Peak bytes a `tokens`-long prefill allocates beyond what is already held (activations, logits of one row)."""
    device = model.embed.weight.device
    nb = math.ceil(tokens / block_size) + 1
    cache = PagedKVCache(model.cfg, nb, block_size, model.embed.weight.dtype, device)
    table = torch.arange(1, nb, device=device)[None]
    cache.batch = paged_batch(table, torch.zeros(1, dtype=torch.long, device=device),
                              torch.full((1,), tokens, device=device), tokens, 0, block_size)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    hidden = model.hidden_states(ids, cache.batch.positions, cache=cache, slots=cache.batch.query_slots)
    model.logits(hidden[:, -1])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del cache, hidden
    torch.cuda.empty_cache()
    return peak
