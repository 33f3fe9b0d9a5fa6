"""Train the built-in models on scikit-learn's digits and write them to diffes_pl/assets/.

    python scripts/train_tiny.py            # ~15 minutes on 2 CPU cores

Writes tiny_digits.safetensors (the DiT denoiser, EMA weights, fp16) and digits_classifier.safetensors
(the digits-FID feature network). Settings: linear betas, ε-prediction, 10 % label dropout (null
class 10), EMA 0.995, batch 256, AdamW 1e-3 with cosine decay, 3,000 steps, seed 0.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file

from diffes_pl.data.digits import NUM_CLASSES, load_digits_split
from diffes_pl.denoisers.assets import asset_path
from diffes_pl.denoisers.tiny import SCHEDULER_CONFIG, build_tiny_dit
from diffes_pl.evaluation.digits_classifier import DigitsClassifier


def train_classifier(images, labels, steps: int, gen: torch.Generator) -> DigitsClassifier:
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(steps):
        idx = torch.randint(len(labels), (256,), generator=gen)
        x = images[idx]
        # Light noise and 1-pixel shifts: generated digits are not exactly like the scans.
        x = x + 0.1 * torch.randn(x.shape, generator=gen)
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train_denoiser(images, labels, steps: int, gen: torch.Generator):
    model = build_tiny_dit(weights=False).train().requires_grad_(True)
    for emb in model.modules():  # label dropout is done once per sample below, not per block
        if hasattr(emb, "dropout_prob"):
            emb.dropout_prob = 0.0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_schedule = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(len(labels), (256,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < 0.1] = NUM_CLASSES  # null class for CFG
        t = torch.randint(0, 1000, (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_schedule.add_noise(x0, noise, t)
        pred = model(xt, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - 0.995)
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f} s", flush=True)
    return ema


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="denoiser training steps")
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["denoiser", "classifier"], default=None)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_split("train")
    if args.only in (None, "classifier"):
        clf = train_classifier(images, labels, args.classifier_steps, gen)
        test_x, test_y = load_digits_split("test")
        with torch.no_grad():
            acc = (clf(test_x).argmax(1) == test_y).float().mean().item()
        print(f"classifier held-out accuracy {acc:.4f}")
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(asset_path("digits_classifier.safetensors")))
    if args.only in (None, "denoiser"):
        ema = train_denoiser(images, labels, args.steps, gen)
        state = {k: v.detach().half().contiguous() for k, v in ema.state_dict().items()}
        save_file(state, str(asset_path("tiny_digits.safetensors")))
    print("wrote", asset_path(""))


if __name__ == "__main__":
    main()
