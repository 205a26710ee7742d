"""Converts a PyTorch ``.bin`` checkpoint folder to safetensors, once, so nvl_jax can load it.

Some hub checkpoints the method uses ship only pickled ``pytorch_model*.bin``
shards (``lmsys/vicuna-13b-v1.5``). Reading a pickle needs torch, which nvl_jax
never imports at run time; this one-off tool does, shard by shard, keeping the
sharding and writing the matching ``model.safetensors.index.json``. Other files
(configs, tokenizer) are copied.

    python -m nvl_jax.models.convert_to_safetensors /ckpt/vicuna-13b-v1.5 /ckpt/vicuna-13b-v1.5-st
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import shutil

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

BIN_INDEX_NAMES = {"pytorch_model.bin.index.json": "model", "diffusion_pytorch_model.bin.index.json":
                   "diffusion_pytorch_model"}
BIN_NAMES = {"pytorch_model.bin": "model", "diffusion_pytorch_model.bin": "diffusion_pytorch_model"}


def _bin_shards(src: Path) -> tuple[list[Path], str]:
    """The ``.bin`` files of ``src`` and the stem their safetensors get."""
    for index_name, stem in BIN_INDEX_NAMES.items():
        if (src / index_name).exists():
            weight_map = json.loads((src / index_name).read_text())["weight_map"]
            return [src / name for name in sorted(set(weight_map.values()))], stem
    for name, stem in BIN_NAMES.items():
        if (src / name).exists():
            return [src / name], stem
    raise FileNotFoundError(f"{src}: no {' or '.join([*BIN_NAMES, *BIN_INDEX_NAMES])} to convert")


def _to_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 is reinterpreted bit for bit (numpy has no native bf16)."""
    import torch

    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def convert(src: str | Path, dst: str | Path) -> Path:
    """Writes ``dst`` with ``src``'s weights as safetensors shards and copies of its other files."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting .bin checkpoints needs torch: pip install torch") from e
    src, dst = Path(src), Path(dst)
    shards, stem = _bin_shards(src)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total_size = {}, 0
    for i, shard in enumerate(tqdm(shards, desc="converting", unit="shard"), start=1):
        state = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        tensors = {key: _to_numpy(value) for key, value in state.items()}
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, dst / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total_size += sum(t.nbytes for t in tensors.values())
        del state, tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for path in src.iterdir():
        if path.is_file() and path not in shards and path.name not in BIN_INDEX_NAMES:
            shutil.copy2(path, dst / path.name)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder holding pytorch_model*.bin (and its index, configs, tokenizer)")
    parser.add_argument("dst", help="folder to write the safetensors checkpoint into")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.src, args.dst)}")


if __name__ == "__main__":
    main()
