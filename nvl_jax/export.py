"""Exports a stage-2 run's trained weights: ``python -m nvl_jax.export --workdir=RUN --out=DIR``.

Writes ``DIR/llm/`` (the LLM with its LoRA adapters merged, as a Hugging Face safetensors folder
that transformers' ``LlamaForCausalLM.from_pretrained`` reads, with the tokenizer beside it) and
``DIR/projector.safetensors`` (the projector on its own, keys ``linear_1.weight`` ... in
PyTorch's ``[out, in]`` layout, as LLaVA's ``mm_projector.bin`` holds them). LoRA runs never lose
their projector: it is saved with every checkpoint and exported here.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "a stage-2 (brain-language) run folder", required=True)
_OUT = flags.DEFINE_string("out", None, "output folder (default: RUN/export)")


def projector_tensors(projector) -> dict:
    """``{"linear_1.weight": [out, in], "linear_1.bias": [out], ...}`` as numpy arrays."""
    import numpy as np

    tensors = {}
    for name in ("linear_1", "linear_2"):
        layer = getattr(projector, name)
        tensors[f"{name}.weight"] = np.ascontiguousarray(np.asarray(layer.kernel[...]).T)
        tensors[f"{name}.bias"] = np.asarray(layer.bias[...])
    return tensors


def export_run(workdir: str | Path, out: str | Path | None = None) -> Path:
    """Writes ``out/llm/`` and ``out/projector.safetensors``; returns ``out``."""
    from safetensors.numpy import save_file

    from nvl_jax.models.brain_lm import lora
    from nvl_jax.models.llama import export
    from nvl_jax.training import loop

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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    export_run(_WORKDIR.value, _OUT.value)


if __name__ == "__main__":
    app.run(main)
