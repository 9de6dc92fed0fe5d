"""Reward functions for `stage: grpo` (examples/align_grpo.yaml names them as 'examples/grpo_rewards.py:NAME').

A reward function is called with keyword arguments: `prompts` (each a list of chat messages), `completions` (texts),
and every column of the prompts file as a list aligned with the completions (a parameter without a default that
names a column makes the run check, before training, that every row has it). It may also take `completion_ids` and
`prompt_ids` (token ids). It returns one number per completion, or None where it has no opinion. One that raises is
retried completion by completion; the failures, and NaN or infinite scores, are logged with their prompt index and
counted as `reward_missing`, and the run goes on.
"""
from __future__ import annotations


def brevity(prompts, completions, completion_ids, **columns):
    """0 up to 256 tokens, then down to -1 at 512: long answers cost a little."""
    return [-min(max(len(ids) - 256, 0) / 256, 1.0) for ids in completion_ids]


def answer_in_tags(prompts, completions, answer):
    """1 when the text inside <answer>…</answer> contains the reference's final number (GSM8K's '#### 42')."""
    out = []
    for text, ref in zip(completions, answer):
        want = str(ref).rsplit("####", 1)[-1].strip().replace(",", "")
        inside = text.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0] if "<answer>" in text else ""
        out.append(float(bool(want) and want in inside.replace(",", "")))
    return out
