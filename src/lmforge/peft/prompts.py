"""Prompt-style methods: learned virtual tokens the real tokens attend to; the model's weights stay untouched.

- **prefix** (Li & Liang 2021): learned key/value prefixes at every layer, optionally produced by an MLP
  (``prefix_projection``) during training; only the resulting prefix is saved.
- **ptuning_v2** (Liu et al. 2022): the same deep prompts at every layer, no reparameterisation.
- **prompt_tuning** (Lester et al. 2021): a soft prompt of ``n`` embeddings in front of the input, initialised from
  vocabulary embeddings or from a text.
- **ptuning** (P-Tuning v1, Liu et al. 2021): the soft prompt is the output of a prompt encoder (MLP or LSTM) over
  trainable embeddings.

One mechanism serves all four: every layer's attention gets ``n`` extra keys/values in front of the sequence's own,
visible to every query (also across packed documents, and in cached decoding, where the cache holds only the real
tokens), and the real tokens' positions start at ``n``, as when PEFT prepends the prompt. For the input-level methods
the per-layer keys/values are the model's own for the soft prompt: a short forward of the ``n`` prompt embeddings at
positions 0..n-1 (causal, so the prompt never sees the text) -- identical to concatenating embeddings at the input.

The model's seam: the method sets the encoder as ``model.prompt_encoder``; every forward then asks it for the
per-layer prefix and calls ``Transformer.hidden_states(..., prefix_kv=[(k, v)] * n_layers)``, which shifts the
positions and hands each layer's ``Attention.forward(..., prefix_kv)`` its keys/values (packed rows take the dense
mask path).

Adapters are PEFT files (PREFIX_TUNING, PROMPT_TUNING, P_TUNING) holding ``prompt_embeddings``: for prefix methods
(n, n_layers * 2 * kv_dim), for prompt methods (n, d_model) -- in both cases what the encoder outputs, as PEFT saves.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import changed_fields
from ..errors import CheckpointError, ConfigError
from .common import read_adapter_config, read_adapter_tensors, write_adapter_dir
from .lora import load_tensors_into
from .methods import Method, register_method

__all__ = ["PrefixEncoder", "PromptEncoder", "PrefixTuningMethod", "PTuningV2Method",
           "PromptTuningMethod", "PTuningMethod", "install_prefix_hook", "prompt_pass"]


# ------------------------------------------------------------------------------------------------ the model seam


class _Capture:
    """A pass-through KV cache: each layer's keys/values (after qk-norm and RoPE) are recorded and attended as
    they are."""

    def __init__(self):
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, slots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.kv.append((k, v))
        return k, v


def install_prefix_hook(model: nn.Module, encoder: nn.Module) -> None:
    """Make `encoder` the model's `prompt_encoder`: every forward then attends to its prefix (see the module
    docstring)."""
    if model.prompt_encoder is not None:
        raise ConfigError("the model already has a prompt method applied; apply one to a fresh base model")
    if model.cfg.attention != "gqa":
        raise ConfigError(f"prefix/prompt methods need per-head keys and values; attention={model.cfg.attention!r} "
                          "caches a latent instead: use method=lora")
    model.prompt_encoder = encoder


def prompt_pass(model: nn.Module, embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (k, v), each (1, Hkv, n, hd), of `embeds` (n, d_model) run through the model at positions 0..n-1:
    exactly the keys/values these embeddings would have at the front of the input."""
    n = embeds.shape[0]
    pos = torch.arange(n, device=embeds.device)[None]  # (1, n)
    x = model.embed_inputs(None, pos, embeds=embeds[None])  # (1, n, d)
    ropes = model.rope_tables(pos, x.dtype)
    mask = model.span_mask(pos, pos, torch.arange(n, device=x.device), False)  # causal: the prompt sees no text
    capture = _Capture()
    model.run_blocks(x, ropes, [mask] * len(model.layers), capture, None)
    return capture.kv


# ------------------------------------------------------------------------------------------------------ encoders


class _Encoder(nn.Module):
    """Base: produces the per-layer prefix; caches it while nothing can change it (eval, no grad)."""

    n_virtual: int

    def prefix(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def cached_prefix(self, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.training or torch.is_grad_enabled():
            return self.prefix(model)
        key = tuple((id(p), p._version) for p in self.parameters()) + (model.embed.weight.dtype,)
        if getattr(self, "_cache_key", None) != key:
            self._cache_key, self._cache = key, self.prefix(model)
        return self._cache


class PrefixEncoder(_Encoder):
    """Per-layer key/value prefixes. Plain: ``embedding`` (n, L * 2 * kv_dim) is the prefix. With projection:
    ``embedding`` (n, kv_dim) -> Linear -> tanh -> Linear -> (n, L * 2 * kv_dim) (Li & Liang's reparameterisation).
    The flat layout is PEFT's: per virtual token, [layer0 key, layer0 value, layer1 key, ...], each (Hkv, hd)."""

    def __init__(self, n_virtual: int, n_layers: int, kv_heads: int, head_dim: int, projection: bool = False,
                 hidden: int = 512, device=None):
        super().__init__()
        self.n_virtual, self.n_layers, self.kv_heads, self.head_dim = n_virtual, n_layers, kv_heads, head_dim
        kv_dim, flat = kv_heads * head_dim, n_layers * 2 * kv_heads * head_dim
        self.embedding = nn.Parameter(torch.randn(n_virtual, kv_dim if projection else flat, device=device))
        self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, flat)).to(device) \
            if projection else None

    def flat(self) -> torch.Tensor:
        """(n, L * 2 * kv_dim): what PEFT saves as prompt_embeddings."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def prefix(self, model):
        kv = self.flat().view(self.n_virtual, 2 * self.n_layers, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(self.n_layers)]  # (1, Hkv, n, hd) each

    @torch.no_grad()
    def init_from(self, model: nn.Module, token_ids: torch.Tensor) -> None:
        """Plain prefix := the model's own keys/values of real tokens (Li & Liang: init from real words' activations)"""
        kv = prompt_pass(model, model.embed(token_ids))  # per layer (1, Hkv, n, hd)
        flat = torch.stack([t[0] for pair in kv for t in pair])  # (2L, Hkv, n, hd)
        self.embedding.copy_(flat.permute(2, 0, 1, 3).reshape(self.n_virtual, -1))


class PromptEncoder(_Encoder):
    """Soft prompt (n, d_model) at the input: ``embedding`` itself (prompt tuning), or the output of an MLP / LSTM
    prompt encoder over it (P-Tuning v1); the per-layer prefix is the model's own keys/values for it."""

    def __init__(self, n_virtual: int, d_model: int, reparam: Literal["none", "mlp", "lstm"] = "none",
                 hidden: int = 128, device=None):
        super().__init__()
        self.n_virtual, self.reparam = n_virtual, reparam
        self.embedding = nn.Parameter(torch.randn(n_virtual, d_model, device=device))
        self.lstm = None
        if reparam == "lstm":
            self.lstm = nn.LSTM(d_model, hidden, num_layers=2, bidirectional=True, batch_first=True, device=device)
            self.head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, d_model))
        elif reparam == "mlp":
            self.head = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, d_model))
        else:
            self.head = None
        if self.head is not None:
            self.head.to(device)
            with torch.no_grad():  # the encoder starts as a no-op around the embeddings' (vocabulary) init
                self.head[-1].weight.zero_()
                self.head[-1].bias.zero_()

    def embeds(self) -> torch.Tensor:
        """(n, d_model): the soft prompt (what PEFT saves as prompt_embeddings). With an encoder it is
        ``embedding + head(mlp_or_lstm(embedding))``: a residual encoder whose last layer starts at zero, so training
        starts from the initial prompt (PEFT's encoder has no residual; the saved output is the same kind of tensor)."""
        if self.head is None:
            return self.embedding
        h = self.lstm(self.embedding[None])[0][0] if self.lstm is not None else self.embedding
        return self.embedding + self.head(h)

    def prefix(self, model):
        return prompt_pass(model, self.embeds())


# ------------------------------------------------------------------------------------------------------ methods


def _sample_vocab(model: nn.Module, n: int, top: int = 5000) -> torch.Tensor:
    """n random token ids among the first `top` (Lester et al. sample from the 5,000 most common tokens)."""
    return torch.randint(0, min(top, model.cfg.vocab_size), (n,), device=model.embed.weight.device)


class _PromptMethod(Method):
    """Shared by the four prompt methods: state, PEFT save/load, no merge."""

    peft_type: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = Field(20, ge=1)
    """Number of virtual tokens (prefix length)."""

    def build_encoder(self, model: nn.Module) -> _Encoder:
        raise NotImplementedError

    def initialize(self, model: nn.Module, encoder: _Encoder) -> None:
        """Set the encoder's starting values (runs after the hook is installed: inits may run the model)."""

    def apply(self, model: nn.Module) -> None:
        model.requires_grad_(False)
        encoder = self.build_encoder(model)
        install_prefix_hook(model, encoder)
        self.initialize(model, encoder)
        encoder.requires_grad_(True)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"prompt_encoder.{n}": p.detach() for n, p in model.prompt_encoder.named_parameters()}

    def merge(self, model: nn.Module) -> None:
        """Nothing to merge: a prompt is not a weight."""

    def export(self, model: nn.Module, out_dir: str | Path) -> Path:
        raise ConfigError(f"{self.name} adds virtual tokens, which a plain HF checkpoint cannot hold; share the PEFT "
                          "adapter (method.save) instead")

    def peft_config(self, model: nn.Module) -> dict:
        cfg = model.cfg
        return {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": self.num_virtual_tokens,
                "num_transformer_submodules": 1, "num_layers": cfg.n_layers, "inference_mode": True,
                "modules_to_save": None, "revision": None}

    def saved_embeddings(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def save(self, model: nn.Module, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
        config = {**self.peft_config(model), "base_model_name_or_path": base_model_name_or_path}
        with torch.no_grad():
            return write_adapter_dir(out_dir, config, {"prompt_embeddings": self.saved_embeddings(model)})

    def load(self, model: nn.Module, path: str | Path) -> None:
        """Apply and load a PEFT adapter of this kind: its saved prompt_embeddings become a plain (non-projected,
        encoder-free) prompt, which computes exactly what the saved run computed."""
        raw = read_adapter_config(path)
        kinds = self.loads_peft_types
        if raw.get("peft_type") not in kinds:
            raise CheckpointError(f"{path}: peft_type {raw.get('peft_type')!r} is not one of {', '.join(kinds)}")
        tensors = read_adapter_tensors(path)
        if "prompt_embeddings" not in tensors:
            raise CheckpointError(f"{path}: the adapter has no 'prompt_embeddings' tensor")
        method = self.plain(raw)
        method.apply(model)
        current = {"prompt_embeddings": model.prompt_encoder.embedding}
        load_tensors_into(current, {"prompt_embeddings": tensors["prompt_embeddings"]}, f"{path}")

    loads_peft_types: ClassVar[tuple[str, ...]] = ()

    def plain(self, raw: dict) -> _PromptMethod:
        raise NotImplementedError


@register_method
class PrefixTuningMethod(_PromptMethod):
    """Prefix tuning: learned per-layer key/value prefixes (optionally MLP-reparameterised); PEFT PREFIX_TUNING."""

    name: ClassVar[str] = "prefix"
    trains: ClassVar[str] = "key/value prefixes at every layer (+ MLP while training)"
    artifact: ClassVar[str] = "PEFT adapter (PREFIX_TUNING), prefix only"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    loads_peft_types: ClassVar[tuple[str, ...]] = ("PREFIX_TUNING",)

    prefix_projection: bool = False
    """Produce the prefix with an MLP over smaller embeddings while training (Li & Liang); only its output is saved."""
    encoder_hidden_size: int = Field(512, ge=1)
    """Hidden size of the projection MLP."""
    init: Literal["vocab", "random"] = "vocab"
    """Plain prefix init: 'vocab' = the model's own keys/values of random vocabulary tokens, 'random' = N(0, 1)."""

    @model_validator(mode="after")
    def _hidden_needs_projection(self):
        if ("encoder_hidden_size" in changed_fields(self) and not self.prefix_projection
                and "encoder_hidden_size" not in getattr(self, "derived", ())):  # ptuning_v2 refuses it itself
            raise ValueError(f"{self.name}.encoder_hidden_size is the projection MLP's width, which only "
                             f"{self.name}.prefix_projection=true builds: set it or drop encoder_hidden_size")
        return self

    def build_encoder(self, model):
        cfg = model.cfg
        return PrefixEncoder(self.num_virtual_tokens, cfg.n_layers, cfg.kv_heads, cfg.dim_per_head,
                             self.prefix_projection, self.encoder_hidden_size, device=model.embed.weight.device)

    def initialize(self, model, encoder):
        if self.init == "vocab" and not self.prefix_projection:
            encoder.init_from(model, _sample_vocab(model, self.num_virtual_tokens))

    def peft_config(self, model):
        cfg = model.cfg
        return {**super().peft_config(model), "token_dim": cfg.kv_heads * cfg.dim_per_head,
                "num_attention_heads": cfg.kv_heads, "encoder_hidden_size": self.encoder_hidden_size,
                "prefix_projection": self.prefix_projection}

    def saved_embeddings(self, model):
        return model.prompt_encoder.flat()

    def plain(self, raw):
        return PrefixTuningMethod(num_virtual_tokens=raw.get("num_virtual_tokens") or 1, init="random")


@register_method
class PTuningV2Method(PrefixTuningMethod):
    """P-Tuning v2: deep prompts (key/value prefixes) at every layer, no reparameterisation; PEFT PREFIX_TUNING."""

    name: ClassVar[str] = "ptuning_v2"
    trains: ClassVar[str] = "key/value prefixes at every layer"
    artifact: ClassVar[str] = "PEFT adapter (PREFIX_TUNING)"
    derived: ClassVar[tuple[str, ...]] = ("prefix_projection", "encoder_hidden_size")  # no reparameterisation

    @model_validator(mode="after")
    def _no_projection(self):
        if self.prefix_projection:
            raise ValueError("ptuning_v2 has no reparameterisation; use method 'prefix' for prefix_projection")
        return self

    def plain(self, raw):
        return PTuningV2Method(num_virtual_tokens=raw.get("num_virtual_tokens") or 1, init="random")


@register_method
class PromptTuningMethod(_PromptMethod):
    """Prompt tuning: a soft prompt at the input only; PEFT PROMPT_TUNING."""

    name: ClassVar[str] = "prompt_tuning"
    trains: ClassVar[str] = "soft prompt embeddings at the input"
    artifact: ClassVar[str] = "PEFT adapter (PROMPT_TUNING)"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    loads_peft_types: ClassVar[tuple[str, ...]] = ("PROMPT_TUNING", "P_TUNING")

    init: Literal["vocab", "text", "random"] = "vocab"
    """'vocab': embeddings of random vocabulary tokens; 'text': of init_text's tokens (repeated to length);
    'random': N(0, std of the embedding matrix)."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (init: text), e.g. 'Reverse the letters:'."""
    tokenizer: str | None = None
    """Directory with tokenizer.json for init_text."""

    @model_validator(mode="after")
    def _text(self):
        if self.init == "text" and not (self.init_text and self.tokenizer):
            raise ValueError("prompt_tuning init 'text' needs init_text and tokenizer (a directory with "
                             "tokenizer.json)")
        unread = [k for k in ("init_text", "tokenizer") if k in changed_fields(self)]
        if self.init != "text" and unread:
            raise ValueError(f"{self.name}.{unread[0]} is read by {self.name}.init=text only, but init is "
                             f"'{self.init}': set {self.name}.init=text or drop it")
        return self

    @torch.no_grad()
    def init_embeddings(self, model: nn.Module, enc: PromptEncoder) -> None:
        n, table = self.num_virtual_tokens, model.embed.weight
        if self.init == "random":
            enc.embedding.copy_(torch.randn_like(enc.embedding) * table.float().std())
            return
        if self.init == "text":
            from ..tokenizer import Tokenizer

            ids = Tokenizer.from_dir(self.tokenizer).encode(self.init_text)
            if not ids:
                raise ConfigError("prompt_tuning init_text encodes to no tokens")
            ids = torch.tensor((ids * n)[:n], device=table.device)
        else:
            ids = _sample_vocab(model, n)
        enc.embedding.copy_(table[ids].float())

    def build_encoder(self, model):
        return PromptEncoder(self.num_virtual_tokens, model.cfg.d_model, device=model.embed.weight.device)

    def initialize(self, model, encoder):
        self.init_embeddings(model, encoder)

    def peft_config(self, model):
        cfg = model.cfg
        return {**super().peft_config(model), "token_dim": cfg.d_model, "num_attention_heads": cfg.n_heads,
                "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                "tokenizer_kwargs": None}

    def saved_embeddings(self, model):
        return model.prompt_encoder.embeds()

    def plain(self, raw):
        return PromptTuningMethod(num_virtual_tokens=raw.get("num_virtual_tokens") or 1, init="random")


@register_method
class PTuningMethod(PromptTuningMethod):
    """P-Tuning v1: the soft prompt comes from an MLP or LSTM prompt encoder; PEFT P_TUNING (encoder output saved)."""

    name: ClassVar[str] = "ptuning"
    trains: ClassVar[str] = "prompt embeddings + MLP/LSTM prompt encoder"
    artifact: ClassVar[str] = "PEFT adapter (P_TUNING), encoder output"
    peft_type: ClassVar[str] = "P_TUNING"
    loads_peft_types: ClassVar[tuple[str, ...]] = ("P_TUNING", "PROMPT_TUNING")

    encoder: Literal["mlp", "lstm"] = "mlp"
    """Prompt encoder: MLP (3 layers) or bidirectional 2-layer LSTM + MLP head."""
    encoder_hidden_size: int = Field(128, ge=1)
    """Hidden width of the prompt encoder (its MLP, and the LSTM's with encoder=lstm)."""

    def build_encoder(self, model):
        return PromptEncoder(self.num_virtual_tokens, model.cfg.d_model, self.encoder, self.encoder_hidden_size,
                             device=model.embed.weight.device)

    def peft_config(self, model):
        config = super().peft_config(model)
        for key in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            config.pop(key)
        return {**config, "encoder_reparameterization_type": self.encoder.upper(),
                "encoder_hidden_size": self.encoder_hidden_size, "encoder_num_layers": 2, "encoder_dropout": 0.0}

    def plain(self, raw):
        return PromptTuningMethod(num_virtual_tokens=raw.get("num_virtual_tokens") or 1, init="random")
