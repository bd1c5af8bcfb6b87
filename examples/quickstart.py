"""
Decode with BPD on the shipped reference model and show it is the base model's own output, faster.

    python examples/quickstart.py "To be, or not to be" --max-new-tokens 64

Uses `reference/heads` (trained draft heads) on `reference/base`; falls back to fresh (untrained) heads on the base
when no trained heads are shipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_bpd import BPDForCausalLM

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="It is a truth universally acknowledged, that")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(REFERENCE / "base")
    if (REFERENCE / "heads" / "bpd_heads.safetensors").exists():
        model = BPDForCausalLM.from_pretrained(
            REFERENCE / "heads", base_model=str(REFERENCE / "base"), dtype=torch.float32
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(REFERENCE / "base", dtype=torch.float32)
        model = BPDForCausalLM.from_base(base, num_draft_heads=4)
    model.eval()
    ids = tok(args.prompt, return_tensors="pt")
    start = time.perf_counter()
    plain = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    plain_s = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(
        **ids, max_new_tokens=args.max_new_tokens, do_sample=False, use_bpd=True, return_dict_in_generate=True
    )
    bpd_s = time.perf_counter() - start
    print(tok.decode(out.sequences[0], skip_special_tokens=True))
    print(f"\nidentical to plain greedy: {torch.equal(plain, out.sequences)}")
    print(f"block efficiency: {out.block_efficiency:.2f} tokens per serial call ({out.num_serial_calls} calls)")
    print(f"wall clock: plain {plain_s:.2f}s, BPD {bpd_s:.2f}s (one run each; see `hf-bpd bench` for medians)")


if __name__ == "__main__":
    main()
