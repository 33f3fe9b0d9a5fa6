"""benchmarks/rehearsal.py on its smallest setting (the built-in model, 1 stage, 2 steps, 1 generation):
every phase runs in its own process and the JSON records what the benchmark reports."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rehearsal.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_rehearsal_records_every_phase(tmp_path):
    out = tmp_path / "rehearsal.json"
    cmd = [sys.executable, str(SCRIPT), "--model", "tiny", "--stages", "1", "--steps", "2", "--nsamples", "2",
           "--images", "4", "--probes", "2", "--generations", "1", "--eval-images", "2",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, check=False, env=ENV, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["device"] == "cpu" and result["pruner"] == "OBSPruner"
    assert set(result["phases"]) == {"predict", "fit", "test"}  # tiny is built in: no build phase
    for name, phase in result["phases"].items():
        assert phase["returncode"] == phase["exit_code"] == 0, name
        assert phase["seconds"] > 0
        assert 100 * 2**20 < phase["peak_host_bytes"] < 16 * 2**30, name  # torch alone is over 100 MiB
        assert "peak_gpu_allocated_bytes" not in phase
    assert result["peak_host_bytes"] == max(p["peak_host_bytes"] for p in result["phases"].values())
    assert result["total_seconds"] == pytest.approx(sum(p["seconds"] for p in result["phases"].values()), abs=0.05)
    solves = result["phases"]["predict"]["obs_solve_lines"]
    assert len(solves) == 1 and solves[0].startswith("stage 0: OBS solve ") and "(6 blocks, 12 groups;" in solves[0]
    assert len(result["schedule_levels"]) == 1
    assert set(result["evaluation"]) == {"dense", "uniform", "searched"}
    assert "CPU only" in result["machine"]["note"]
    for name in ("predict", "fit", "test"):  # each phase's full output is kept beside the figures
        assert (tmp_path / "work" / f"{name}.log").is_file()


def _rehearsal():
    spec = importlib.util.spec_from_file_location("rehearsal", SCRIPT)
    rehearsal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearsal)
    return rehearsal


TINY_VAE = {"block_out_channels": (8, 8), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 2}
# The build step on reduced dims (`tiny`: the test-only override of the shipped config and encoder widths)
TINY = {
    "pixart": {"denoiser": {"num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 2,
                            "cross_attention_dim": 16, "caption_channels": 16}},
    "sd3": {"denoiser": {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8, "joint_attention_dim": 32,
                         "caption_projection_dim": 16, "pooled_projection_dim": 24, "pos_embed_max_size": 8},
            "widths": {"text_encoder": 8, "text_encoder_2": 16}},
    "sdxl": {"denoiser": {"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8,
                          "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
                          "attention_head_dim": [2, 4], "transformer_layers_per_block": [1, 2],
                          "cross_attention_dim": 32, "addition_time_embed_dim": 8,
                          "projection_class_embeddings_input_dim": 6 * 8 + 16},
             "widths": {"text_encoder": 16, "text_encoder_2": 16}},
}


@pytest.mark.parametrize("family", ["pixart", "sd3", "sdxl"])
def test_text_family_build_loads_as_its_family_with_text_encoders(tmp_path, family):
    """The build step writes a pipeline folder `load_denoiser` reads as the right family, with its VAE
    and text encoders, whose prompt encodings the denoiser takes (here on reduced dims)."""
    from diffes_pl import load_denoiser
    from diffes_pl.denoisers import check_name

    rehearsal = _rehearsal()
    sizes = rehearsal._build_model(family, tmp_path / "model", tiny={**TINY[family], "vae": TINY_VAE, "image_size": 16})
    assert str(check_name(str(tmp_path / "model"))) == f"{family}-folder"
    adapter = load_denoiser(str(tmp_path / "model"))
    assert adapter.family == family and adapter.vae is not None and adapter.has_text_encoders
    assert adapter.latent_shape[1:] == (8, 8) and sizes["latent_side"] == 8  # 16-pixel images, VAE factor 2
    cond = adapter.encode_prompts(rehearsal.PROMPTS)  # validate_condition: widths fit the denoiser
    assert len(cond) == len(rehearsal.PROMPTS)
    assert all(e["layers"] == rehearsal.ENCODER_LAYERS for e in sizes["text_encoders"].values())
    assert sizes["denoiser_parameters"] == sum(p.numel() for p in adapter.denoiser.parameters())


def test_text_family_encoders_must_fit_the_denoiser(tmp_path):
    rehearsal = _rehearsal()
    tiny = {**TINY["sd3"], "widths": {"text_encoder": 8, "text_encoder_2": 8}, "vae": TINY_VAE, "image_size": 16}
    with pytest.raises(ValueError, match="do not fit"):  # 8 + 8 ≠ pooled_projection_dim 24
        rehearsal._build_model("sd3", tmp_path / "model", tiny=tiny)


def test_text_families_take_captions_and_prompts(tmp_path):
    """A text family's run reads captions (imagefolder metadata.jsonl `text`) and probes prompts."""
    import argparse

    rehearsal = _rehearsal()
    rehearsal._write_images(tmp_path / "images", 4, 8, captions=rehearsal.CAPTIONS)
    rows = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == rehearsal.CAPTIONS[:4] and all((tmp_path / "images" / r["file_name"]).is_file()
                                                                      for r in rows)
    args = argparse.Namespace(model="sd3", device="cpu", generations=1, pruner="OBSPruner", stages=1, steps=2, probes=2,
                              calibrate_by="block", nsamples=2, dtype="float32", levels=10,
                              stat_dtype=None)
    config = rehearsal._config(args, "/m", tmp_path / "images", tmp_path / "run")
    assert config["data"]["caption_column"] == "text" and config["data"]["label_column"] is None
    assert config["model"]["prompts"] == rehearsal.PROMPTS and config["model"]["sampler"] == "flow_euler"
    assert config["model"]["levels"] == 10 and config["model"]["pruner"]["init_args"] == {"mode": "fast"}
