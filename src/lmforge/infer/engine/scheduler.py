"""Continuous batching: which requests run this step, with how many tokens each, and what gets preempted.

Every request is a token list (prompt + generated) and a count of tokens whose K/V are in the cache; a step computes
some of the rest. Running requests go first, in arrival order: a decode needs one token, a prompt still being
prefilled takes what is left of the step's token budget (chunked prefill). Then waiting requests are admitted
(first come, first served) while budget, sequence slots and blocks last, starting from their longest cached prefix.
When a running request needs a block and none is free, the most recently admitted running request is preempted:
its blocks are released and it goes back to the front of the queue to be recomputed later (its generated tokens are
kept, and its full blocks usually survive in the prefix cache). No request is ever dropped for lack of memory.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ...params import SamplingParams
from .paged_cache import BlockPool, block_hashes

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    token_ids: list[int]  # prompt followed by the generated tokens
    params: SamplingParams
    adapter: str | None = None  # the LoRA adapter's prefix-cache namespace (one per load), None = the base model
    adapter_slot: int = 0
    num_prompt: int = 0
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[tuple] = field(default_factory=list)  # chained keys of full computed blocks (prefix cache)
    status: str = WAITING
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    extra: dict = field(default_factory=dict)  # engine-side per-request state (detokenizer, constraint, logprobs)

    def __post_init__(self):
        self.num_prompt = self.num_prompt or len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]


@dataclass
class Scheduled:
    request: Request
    start: int  # first token computed this step (= request.num_computed before the step)
    length: int  # tokens computed this step (1 for a decode)
    samples: bool = False  # whether the chunk reaches the request's last token, so a next token is drawn

    def __post_init__(self):
        self.samples = self.start + self.length == self.request.num_tokens


class Scheduler:
    def __init__(self, pool: BlockPool, max_num_seqs: int, max_num_batched_tokens: int):
        self.pool = pool
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = {"preemptions": 0, "scheduled_tokens": 0, "steps": 0}

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def add(self, request: Request) -> None:
        request.status = WAITING
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _grow(self, req: Request, n_tokens: int) -> bool:
        """Make req's block table cover n_tokens; False (nothing taken) when the pool is short."""
        need = self._blocks_for(n_tokens) - len(req.blocks)
        if need <= 0:
            return True
        got = self.pool.allocate(need)
        if got is None:
            return False
        req.blocks += got
        return True

    def _preempt(self, req: Request) -> None:
        self.pool.release(req.blocks)
        req.blocks, req.hashes, req.num_computed = [], [], 0
        req.status = WAITING
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def free(self, req: Request) -> int:
        """Release a finished or aborted request's blocks (wherever it is queued); returns blocks released."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        n = len(req.blocks)
        self.pool.release(req.blocks)
        req.blocks = []
        return n

    def schedule(self, lookahead: int = 1) -> tuple[list[Scheduled], bool]:
        """This step's chunks, and whether anything was preempted. Decodes get blocks for `lookahead` tokens
        (a multi-step decode), prompts for their chunk."""
        budget = self.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            reserve = lookahead if req.num_tokens - req.num_computed == 1 else n
            while not self._grow(req, req.num_computed + reserve):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                out.append(Scheduled(req, req.num_computed, n))
                budget -= n
                i += 1
        if not preempted:
            budget = self._admit(out, budget)
        self.stats["scheduled_tokens"] += self.max_num_batched_tokens - budget
        self.stats["steps"] += 1
        return out, preempted

    def reserve_decodes(self, reqs: list[Request], steps: int) -> bool:
        """Blocks for `steps` more decode tokens of each running request beyond its num_computed, for a step
        launched without `schedule` (the engine's run-ahead); False when the pool is short (what was taken stays,
        the next `schedule` needs it anyway). Never preempts."""
        if not all(self._grow(r, r.num_computed + steps) for r in reqs):
            return False
        self.stats["scheduled_tokens"] += len(reqs)  # as `schedule` counts a multi-step decode: a token per row
        self.stats["steps"] += 1
        return True

    def _admit(self, out: list[Scheduled], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hits: list[int] = []
            if self.pool.enable_prefix_caching:
                keys = block_hashes(req.token_ids, self.block_size, namespace=req.adapter or "")
                usable = (req.num_tokens - 1) // self.block_size  # always compute >= 1 token to get logits
                hits = self.pool.lookup(keys[:usable])
            start = len(hits) * self.block_size
            n = min(req.num_tokens - start, budget)
            need = self._blocks_for(start + n) - len(hits)
            if need > self.pool.free_after_acquire(hits):
                break
            if self.pool.enable_prefix_caching:
                self.pool.count_lookup(min(usable, len(keys)), len(hits))
                req.hashes = keys[:len(hits)]
            self.pool.acquire(hits)
            req.blocks = hits + self.pool.allocate(need)
            req.num_computed = start
            req.status = RUNNING
            self.waiting.popleft()
            self.running.append(req)
            out.append(Scheduled(req, start, n))
            budget -= n
        return budget

    def cache_full_blocks(self, req: Request) -> None:
        """Register req's newly full, computed blocks in the prefix cache."""
        if not self.pool.enable_prefix_caching:
            return
        full = min(req.num_computed, req.num_tokens) // self.block_size
        if full <= len(req.hashes):
            return
        parent = req.hashes[-1][0] if req.hashes else None
        keys = block_hashes(req.token_ids, self.block_size, namespace=req.adapter or "", start=len(req.hashes),
                            parent=parent)[:full - len(req.hashes)]
        for j, key in enumerate(keys, start=len(req.hashes)):
            self.pool.register(req.blocks[j], key)
        req.hashes += keys
