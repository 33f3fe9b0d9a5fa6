"""MACs of one denoiser forward for every registered model name (the README's MACs table).

    python benchmarks/macs_table.py                                       # every family's hub names
    python benchmarks/macs_table.py PixArt-alpha/PixArt-Sigma-XL-2-1024-MS  # one row

Each architecture is built from the config shipped in `diffes_pl/assets/` on the meta device (no
weights, no memory, no network) and counted by `dp.count_macs`: one forward at batch 1 at the
model's native resolution (the latent side of its shipped config), on the condition its adapter
builds (`example_condition`: the text tokens its pipeline pads prompts to); the CFG duplicate is not
counted. Writes benchmarks/results/macs.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import diffes_pl as dp
from diffes_pl.denoisers import families


def row(name: str) -> dict:
    adapter = dp.load_denoiser(name, weights=False, device="meta")
    cond = adapter.example_condition(1, "meta")
    tokens = None if adapter.conditioning == "class" else int(cond.prompt_embeds.shape[1])
    c, h, w = adapter.latent_shape
    return {"name": name, "family": adapter.family, "latent": [c, h, w], "text_tokens": tokens,
            "macs": dp.count_macs(adapter)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="model names (default: every registered hub name)")
    args = parser.parse_args()
    names = args.names or [n for f in families().values() if not f.builtin for n in f.hub_names]
    rows = [row(n) for n in names]
    for r in rows:
        tokens = "class label" if r["text_tokens"] is None else f"{r['text_tokens']} text tokens"
        print(f"{r['name']:50s} latent {'×'.join(map(str, r['latent'])):10s} {tokens:16s} {r['macs'] / 1e9:12,.1f} G")
    if not args.names:
        out = Path(__file__).parent / "results" / "macs.json"
        out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
