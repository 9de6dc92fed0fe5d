"""Many LoRA adapters served at once: each row of a batch gets its own adapter (or none).

`MultiLoRALinear` wraps a base linear and holds every adapter's A and B stacked, (N+1, r, in) and (N+1, out, r)
with slot 0 all zeros (no adapter) and the LoRA scaling folded into B; ranks are zero-padded to the largest.
Per forward, `AdapterIndex.rows` (B,) says which slot each row uses, and the update is a pair of batched matmuls
over the gathered per-row weights: y = base(x) + (x @ A[idx]^T) @ B[idx]^T. With no adapter in a batch the
wrapper costs one attribute check.

Adapters are PEFT directories read with `lmforge.peft.peft_format.load_peft_adapter` into a weightless skeleton of
the model (so nothing is loaded twice), then copied into the slots.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...models.transformer import Transformer


class AdapterIndex:
    """Shared by all MultiLoRALinear of a model: the adapter slot of each row in the current forward."""

    def __init__(self):
        self.rows: torch.Tensor | None = None  # (B,) long, 0 = base model


def _compute_tensor(layer: nn.Module) -> torch.Tensor:
    """A tensor with the layer's compute dtype and device: its weight, or for a quantized linear (integer codes, maybe
    no parameter at all) its first floating-point parameter or buffer (the scales)."""
    tensors = [*layer.parameters(), *layer.buffers()]
    return next((t for t in tensors if t.is_floating_point()), tensors[0])


class MultiLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, index: AdapterIndex, like: torch.Tensor | None = None):
        """`like`: a tensor of the model's compute dtype and device (default: read from the base layer)."""
        super().__init__()
        self.base_layer, self.index = base_layer, index
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        w = like if like is not None else _compute_tensor(base_layer)
        self.register_buffer("A", torch.zeros(1, 1, self.in_features, dtype=w.dtype, device=w.device))
        self.register_buffer("B", torch.zeros(1, self.out_features, 1, dtype=w.dtype, device=w.device))

    def set_adapter(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Store A (r, in) and scaled B (out, r) in `slot` (None clears it), growing the stacks as needed."""
        r = 0 if a is None else a.shape[0]
        n, rank = max(self.A.shape[0], slot + 1), max(self.A.shape[1], r)
        if (n, rank) != tuple(self.A.shape[:2]):
            A = self.A.new_zeros(n, rank, self.in_features)
            B = self.B.new_zeros(n, self.out_features, rank)
            A[:self.A.shape[0], :self.A.shape[1]] = self.A
            B[:self.B.shape[0], :, :self.B.shape[2]] = self.B
            self.A, self.B = A, B
        self.A[slot].zero_()
        self.B[slot].zero_()
        if a is not None:
            self.A[slot, :r] = a.to(self.A)
            self.B[slot, :, :r] = b.to(self.B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (B, T, out) or (B, out)
        rows = self.index.rows
        if rows is None:
            return y
        x3 = x if x.dim() == 3 else x[:, None]  # the LM head sees one position per row: (B, in)
        h = torch.bmm(x3, self.A[rows].transpose(1, 2))  # (B, T, r)
        delta = torch.bmm(h, self.B[rows].transpose(1, 2))  # (B, T, out)
        return y + delta.view_as(y)


class _ShapeOnlyLinear(nn.Module):
    """A linear with the right in/out features and no real weight: what an adapter is loaded against."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(0, device="cpu"), requires_grad=False)


def read_adapter(cfg, adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{native linear path: (A (r, in), B (out, r) * scaling)} of a PEFT LoRA adapter for a model of `cfg`."""
    from ...peft.lora import lora_layers
    from ...peft.peft_format import _read_config, load_peft_adapter

    if _read_config(Path(adapter_dir)).get("use_dora"):  # (also refuses what is not a LoRA adapter, in one line)
        raise CheckpointError(f"'{adapter_dir}' is a DoRA adapter: its magnitude rescales whole output rows, which "
                              "per-request LoRA slots cannot apply; serve it as the model's --adapter, or merged "
                              "(lmforge export BASE --adapter DIR)")

    with torch.device("meta"):  # embeddings/norms stay weightless; the linears are shape-only CPU stand-ins
        skeleton = Transformer(cfg, linear=lambda name, i, o, bias: _ShapeOnlyLinear(i, o))
    lora_cfg = load_peft_adapter(skeleton, adapter_dir)
    if lora_cfg.modules_to_save:
        raise CheckpointError(f"adapter '{adapter_dir}' also trains {lora_cfg.modules_to_save}; serving several "
                              "adapters at once needs pure LoRA adapters (merge this one: lmforge export)")
    return {path: (layer.lora_A.weight.detach(), layer.lora_B.weight.detach() * layer.scaling)
            for path, layer in lora_layers(skeleton).items()}


class AdapterSet:
    """The adapters a served model knows, by name, each in a slot 1..max_adapters of the stacked weights.

    Adapters come and go while requests run (`add` / `remove`, called between engine steps): a removed adapter's
    name is gone at once, but its weights stay in their slot until a later `add` reuses it, and `add` never takes a
    slot a request in flight still uses (`busy`), so those requests finish with the adapter they started with.
    Every load gets a new prefix-cache namespace (`cache_key`): K/V cached under an unloaded adapter are never
    served to a new one of the same name."""

    def __init__(self, model: Transformer, max_adapters: int = 16):
        self.model, self.max_adapters = model, max_adapters
        self.index = AdapterIndex()
        self.slots: dict[str, int] = {}
        self.keys: dict[str, str] = {}  # name -> prefix-cache namespace of this load
        self.filled: set[int] = set()  # slots holding weights (named, or removed but maybe still in use)
        self.wrapped: dict[str, MultiLoRALinear] = {}
        self._loads = 0

    def __len__(self) -> int:
        return len(self.filled)

    def slot(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.slots:
            raise ConfigError(f"unknown adapter '{name}'; loaded adapters: {', '.join(self.slots) or 'none'}")
        return self.slots[name]

    def cache_key(self, name: str | None) -> str | None:
        return None if name is None else self.keys[name]

    def check_new(self, name: str) -> None:
        """Raise the one-line error `add` would raise for `name` before its weights are read."""
        if name in self.slots:
            raise ConfigError(f"an adapter named '{name}' is already loaded; unload it first")
        if len(self.slots) >= self.max_adapters:
            raise ConfigError(f"at most {self.max_adapters} adapters can be loaded (engine.max_adapters)")

    def add(self, name: str, adapter_dir: str | Path, busy: set[int] = frozenset()) -> int:
        """Load a PEFT LoRA adapter under `name`; returns its slot. Linears it targets get wrapped on first use."""
        self.check_new(name)
        return self.install(name, read_adapter(self.model.cfg, adapter_dir), busy)

    def install(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
                busy: set[int] = frozenset()) -> int:
        """Put weights from `read_adapter` in a free slot under `name` (the part of `add` that changes the model:
        the engine runs it between steps; reading the files can happen anywhere)."""
        from ...models.modules import linear_modules, set_module
        from ..kernels.decode_fusion import unpack_for_decode

        self.check_new(name)
        named = set(self.slots.values())
        slot = next((s for s in range(1, self.max_adapters + 1) if s not in named and s not in busy), None)
        if slot is None:
            raise ConfigError(f"every adapter slot is named or used by requests in flight of unloaded adapters; "
                              f"retry when they finish (or raise engine.max_adapters, now {self.max_adapters})")
        unpack_for_decode(self.model)  # packed q/k/v or gate/up matmuls would bypass the per-row LoRA deltas
        linears = linear_modules(self.model)
        for path in weights:
            if path not in self.wrapped:
                module = linears[path]
                if not isinstance(module, MultiLoRALinear):
                    module = MultiLoRALinear(module, self.index, like=self.model.embed.weight)
                    set_module(self.model, path, module)
                self.wrapped[path] = module
        for path, module in self.wrapped.items():
            a, b = weights.get(path, (None, None))
            module.set_adapter(slot, a, b)
        self._loads += 1
        self.slots[name], self.keys[name] = slot, f"lora-{self._loads}"
        self.filled.add(slot)
        return slot

    def remove(self, name: str) -> int:
        """Forget `name` (requests can no longer pick it); its slot's weights stay for requests still using it."""
        if name not in self.slots:
            raise ConfigError(f"unknown adapter '{name}'; loaded adapters: {', '.join(self.slots) or 'none'}")
        del self.keys[name]
        return self.slots.pop(name)
