"""Checkpoints to the Hugging Face format, and sampling text from either.

``export_checkpoint`` consolidates the fp32 weights of any ZeRO stage with DeepSpeed's own
``get_fp32_state_dict_from_zero_checkpoint`` (ZeRO-3 shards included) and writes config.json,
model.safetensors, the tokenizer and generation_config.json, which
``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from llm_ds.checkpoint import COMPLETE, LATEST, OURS, CheckpointError, is_complete

logger = logging.getLogger("llm_ds")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``global_step<N>``), or a checkpoints folder whose ``latest`` names one."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete llm-ds checkpoint (no {COMPLETE} mark)")
    return path


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a complete checkpoint as a Hugging Face model folder; returns ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    ours = path / OURS
    config = AutoConfig.from_pretrained(str(ours / "hf_config"))
    model = AutoModelForCausalLM.from_config(config)
    state_dict = fp32_state_dict(path)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not fit the saved model config "
            f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(str(ours / "tokenizer"))
    tokenizer.save_pretrained(str(out_dir))
    eos = tokenizer.eos_token_id
    GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=True, max_new_tokens=64, top_k=50
    ).save_pretrained(str(out_dir))
    (out_dir / "llm_ds_source.json").write_text(json.dumps({"checkpoint": str(path.resolve())}) + "\n")
    return out_dir


def fp32_state_dict(path: Path) -> dict:
    """The fp32 weights of checkpoint ``path``, whole, by Hugging Face name. ZeRO shards of one replica are
    joined by DeepSpeed's ``zero_to_fp32``; the shards of tensor-parallel ranks and pipeline stages by its
    universal form (per-parameter fp32 weights, joined along the dimensions AutoTP split them), made once in
    ``<path>/universal``. Weights trained as ``nn.Linear`` (GPT-2's ``Conv1D`` for tensor parallelism) are
    given back in ``Conv1D``'s layout."""
    from llm_ds.checkpoint import saved_parallel

    manifest = json.loads((path / OURS / "manifest.json").read_text())
    split = saved_parallel(path)
    has_shards = any(path.glob("*_optim_states.pt"))
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its progress; stdout is for our output
        if split["tensor"] == split["pipeline"] == 1:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        elif has_shards:
            state_dict = _universal_weights(path, split["pipeline"] > 1)
        elif split["pipeline"] > 1:
            state_dict = _pipeline_layer_files(path)  # without ZeRO the layers' own weights are the fp32 ones
        else:  # llm-ds refuses tensor parallelism without ZeRO before training
            raise CheckpointError(
                f"checkpoint {path}: a tensor-parallel checkpoint without ZeRO shards (ZeRO stage 0) cannot be exported"
            )
    for name in manifest.get("transposed", []):
        state_dict[name] = state_dict[name].t().contiguous()
    return state_dict


def _universal_weights(path: Path, pipeline: bool) -> dict:
    import torch

    from llm_ds.checkpoint import make_universal

    rename = _pipeline_names(path) if pipeline else (lambda name: name)
    return {
        rename(f.parent.name): torch.load(f, map_location="cpu", weights_only=False)["param"]
        for f in sorted((make_universal(path) / "zero").glob("*/fp32.pt"))  # made once, then reused
    }


def _pipeline_layer_files(path: Path) -> dict:
    import torch

    rename = _pipeline_names(path)
    state_dict = {}
    for f in sorted(path.glob("layer_*-model_states.pt")):
        layer = int(f.name.split("-")[0].removeprefix("layer_"))
        weights = torch.load(f, map_location="cpu", weights_only=False)
        state_dict.update({rename(f"{layer}.{k}"): v.float() for k, v in weights.items()})
    return state_dict


def _pipeline_names(path: Path):
    """Pipeline layer names to GPT-2's, for the model the checkpoint at ``path`` holds."""
    from transformers import AutoConfig

    from llm_ds.parallel.pipeline import hf_name

    n_layer = AutoConfig.from_pretrained(str(path / OURS / "hf_config")).n_layer
    return lambda name: hf_name(name, n_layer)


def generate(
    path: str | Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.8, top_k: int = 50, seed: int = 0
) -> str:
    """Sample a continuation of ``prompt`` from an export folder or a checkpoint."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="llm-ds-export-") as tmp:
        model_dir = path if (path / "config.json").is_file() else export_checkpoint(path, tmp)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": top_k} if temperature > 0 else {"do_sample": False}
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)
