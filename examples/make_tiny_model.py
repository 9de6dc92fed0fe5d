"""Write a tiny random checkpoint with transformers (+ a trained BPE tokenizer) to try lmforge on, offline.

    python examples/make_tiny_model.py runs/tiny --arch LlamaForCausalLM
    lmforge info runs/tiny && lmforge generate runs/tiny --prompt "Hello" --max-new-tokens 20
"""
import argparse

from lmforge.testing import TINY_HF_CONFIGS, make_tiny_checkpoint

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="LlamaForCausalLM", choices=sorted(TINY_HF_CONFIGS))
    args = ap.parse_args()
    print(make_tiny_checkpoint(args.out_dir, args.arch))
