"""The reward model (instructGPT step 2): the decoder plus a scalar head read at the last real token, trained on
preference pairs with the pairwise loss -log sigmoid(r_chosen - r_rejected).

On disk it is a Hugging Face checkpoint of the backbone (`save_hf`, any LoRA merged) with the head in its own file,
``score.safetensors`` holding ``score.weight`` (1, d_model): the name transformers' ``*ForSequenceClassification``
models give it. ``model.safetensors.index.json`` lists only the backbone's shards, so `lmforge.models.load_hf` and
``AutoModelForCausalLM`` read the backbone as a causal LM, and ``config.json`` records the head (``reward_head``) and
one label (``id2label``) so ``AutoModelForSequenceClassification.from_pretrained(dir)`` builds a one-output model
into which ``score.weight`` loads as is.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from ..models import Transformer, load_hf, save_hf
from .common import PairObjective, last_token_index, scalar_head
from .config import RewardSection
from .data import collate_pairs

__all__ = [
    "HEAD_FILE",
    "HEAD_TENSOR",
    "RewardModel",
    "RewardObjective",
    "load_reward_model",
    "pair_accuracy",
    "save_reward_model",
]

HEAD_FILE = "score.safetensors"
HEAD_TENSOR = "score.weight"
_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


class RewardModel(torch.nn.Module):
    """r(sequence) = score(final-norm hidden state at the sequence's last real token); one scalar per row."""

    def __init__(self, backbone: Transformer, score: torch.nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        # zeros: an untrained reward model scores everything 0 (its first step moves only the head)
        self.score = score if score is not None else scalar_head(backbone.cfg.d_model, backbone.embed.weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions (B, T), -1 positions = padding (left or right) -> rewards (B,) float32."""
        hidden = self.backbone.hidden_states(tokens, positions)  # (B, T, d)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(positions)]  # (B, d)
        return self.score(last.to(self.score.weight.dtype)).squeeze(-1).float()


class RewardObjective(PairObjective):
    """Pairwise (Bradley-Terry) loss; logs pair accuracy, the mean margin and the mean chosen/rejected rewards."""

    def __init__(self, cfg: RewardSection | None = None):
        self.cfg = cfg or RewardSection()

    def loss_sum(self, ctx, batch, step_units):
        rewards = ctx.model(batch["tokens"], batch["positions"])  # (2B,)
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).sum()
        if self.cfg.center_coef:
            loss = loss + self.cfg.center_coef * ((chosen + rejected) ** 2).sum()
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"reward_accuracy": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum()),
                      "chosen_reward": float(chosen.sum()), "rejected_reward": float(rejected.sum())}


@torch.no_grad()
def pair_accuracy(model: RewardModel, dataset, pad_id: int, batch_size: int = 32) -> float:
    """Share of pairs whose chosen reply the reward model scores strictly higher."""
    was_training = model.training
    model.eval()
    device = model.backbone.embed.weight.device
    hits = 0
    for start in range(0, len(dataset), batch_size):
        b = collate_pairs([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
        chosen, rejected = model(b["tokens"].to(device), b["positions"].to(device)).chunk(2)
        hits += int((chosen > rejected).sum())
    model.train(was_training)
    return hits / max(len(dataset), 1)


def _write_backbone_index(out: Path) -> None:
    """List the backbone's tensors in model.safetensors.index.json (save_hf writes one only when sharding), so loaders
    read the backbone shards and never the head file beside them."""
    index = out / "model.safetensors.index.json"
    if index.is_file():
        return
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        total = sum(math.prod(f.get_slice(n).get_shape()) * _BYTES[f.get_slice(n).get_dtype()] for n in names)
    body = {"metadata": {"total_size": total}, "weight_map": {n: "model.safetensors" for n in names}}
    tmp = index.with_name(f".{index.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, index)


def save_reward_model(model: RewardModel, out_dir: str | Path, method=None, dtype=None) -> Path:
    """Write `model` as described in the module docstring; `method` (the training method) exports the backbone
    (LoRA merged), else the backbone is saved as it is."""
    out = Path(out_dir)
    if method is not None:
        method.export(model.backbone, out)
    else:
        save_hf(model.backbone, out, dtype=dtype)
    _write_backbone_index(out)
    save_file({HEAD_TENSOR: model.score.weight.detach().float().cpu().contiguous()}, str(out / HEAD_FILE),
              metadata={"format": "pt"})
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update({"reward_head": {"file": HEAD_FILE, "tensor": HEAD_TENSOR, "pooling": "last_token"},
                   "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}})
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return out


def load_reward_model(path: str | Path, dtype=None, device: str | torch.device = "cpu") -> RewardModel:
    """A reward model written by `save_reward_model` (the rm stage), in eval mode."""
    path = Path(path)
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise CheckpointError(f"'{path}' is not a reward model: it has no {HEAD_FILE} (train one with stage: rm)")
    backbone = load_hf(path, dtype=dtype, device=device, progress=False)
    tensors = load_file(str(head_file))
    if HEAD_TENSOR not in tensors:
        raise CheckpointError(f"{head_file} lacks '{HEAD_TENSOR}'; it holds {sorted(tensors)}")
    weight = tensors[HEAD_TENSOR]
    if tuple(weight.shape) != (1, backbone.cfg.d_model):
        raise CheckpointError(f"{head_file}: '{HEAD_TENSOR}' has shape {tuple(weight.shape)}, the backbone needs "
                              f"(1, {backbone.cfg.d_model})")
    score = scalar_head(backbone.cfg.d_model, backbone.embed.weight)
    with torch.no_grad():
        score.weight.copy_(weight)
    return RewardModel(backbone, score).eval()
