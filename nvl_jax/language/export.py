"""A stage-2 run's trained weights in the formats other tools read (``python -m nvl_jax.export``).

``out/llm/``: the LLM with its LoRA adapters merged, as a Hugging Face safetensors folder that
transformers' ``LlamaForCausalLM.from_pretrained`` reads, with the tokenizer beside it;
``out/projector.safetensors``: the projector on its own, keys ``linear_1.weight`` ... in PyTorch's
``[out, in]`` layout, as LLaVA's ``mm_projector.bin`` holds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from nvl_jax.models.brain_lm import lora
from nvl_jax.models.llama import export
from nvl_jax.training import loop


def projector_tensors(projector) -> dict:
    """``{"linear_1.weight": [out, in], "linear_1.bias": [out], ...}`` as numpy arrays."""
    tensors = {}
    for name in ("linear_1", "linear_2"):
        layer = getattr(projector, name)
        tensors[f"{name}.weight"] = np.ascontiguousarray(np.asarray(layer.kernel[...]).T)
        tensors[f"{name}.bias"] = np.asarray(layer.bias[...])
    return tensors


def export_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``out/llm/`` and ``out/projector.safetensors``; returns ``out``."""
    task, model, step = loop.restore_model(workdir)
    if task.config.task != "stage2":
        raise ValueError(f"{workdir}: a {task.config.task!r} run; export takes a stage-2 (brain-language) run")
    out = Path(out) if out else Path(workdir) / "export"
    lora.merge_lora(model.llm)
    export.save_pretrained(model.llm, out / "llm")
    task.tokenizer.save_pretrained(out / "llm")
    save_file(projector_tensors(model.projector), str(out / "projector.safetensors"))
    print(f"step {step}: merged LLM -> {out / 'llm'}, projector -> {out / 'projector.safetensors'}")
    return out
