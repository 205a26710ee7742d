"""Reads GGUF files (llama.cpp's single-file checkpoints) one dequantized tensor at a time.

A GGUF holds typed metadata (architecture, sizes, the tokenizer's vocabulary and
chat template) and tensors, each stored as F32, F16, BF16 or a block
quantization (Q4_1, Q8_0, Q4_K, ...). The ``gguf`` package memory-maps the file;
:meth:`GGUFFile.read` dequantizes one tensor to float32 on demand, so a load
holds only the tensor being placed. :class:`GGUFFile` offers the same
``path`` / ``tensors`` / ``read`` interface as
:class:`~nvl_jax.models.safetensors_io.SafetensorsFile`, so the strict loader in
:mod:`nvl_jax.models.hf_loader` takes either.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import _type_traits

_REQUIRED = object()


class GGUFError(ValueError):
    """A GGUF file that cannot be read, or lacks a metadata field the model needs."""


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor: ``shape`` in numpy order (ggml lists dimensions innermost first), as read: float32."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes once dequantized (what the loader places), not bytes in the file."""
        return int(np.prod(self.shape)) * self.dtype.itemsize


# The types gguf.dequantize handles: F32 and F16 itself, every other one through its (private) traits
# table. Checked when the file is opened, so an unreadable tensor fails before any is read.
DEQUANTIZABLE = frozenset({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits})


class GGUFFile:
    """One ``.gguf`` file: ``value(key)`` reads metadata, ``read(name)`` a float32 tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for t in self._reader.tensors:
            if t.tensor_type not in DEQUANTIZABLE:
                names = ", ".join(sorted(q.name for q in DEQUANTIZABLE))
                raise GGUFError(f"{self.path}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the "
                                f"installed gguf package cannot dequantize; it can: {names}")
            self.tensors[t.name] = GGUFTensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name)

    def __contains__(self, key: str) -> bool:
        return key in self._reader.fields

    def value(self, key: str, default=_REQUIRED):
        """The metadata value of ``key`` (a number, string or list); ``default`` when absent, else an error."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GGUFError(f"{self.path}: metadata field {key!r} is missing")
            return default
        return field.contents()

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to a fresh float32 array of ``tensors[name].shape``."""
        tensor, info = self._tensors[name], self.tensors[name]
        # A copy, never a view of the memory map: the file may be closed or replaced after loading.
        return np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(info.shape)


def locate(path_or_name: str | os.PathLike, gguf_file: str | None = None, subfolder: str | None = None) -> Path | None:
    """The GGUF file a checkpoint argument names, or None when it names a safetensors checkpoint.

    ``path_or_name`` is a ``.gguf`` file; a folder with ``gguf_file`` in it; a folder
    holding exactly one ``.gguf`` and no ``config.json``; or, with ``gguf_file``, a hub
    repository to fetch that one file from (as transformers' ``gguf_file=``).
    """
    path = Path(path_or_name)
    if gguf_file is not None:
        if not path.exists():
            return _download(str(path_or_name), gguf_file, subfolder)
        file = (path / subfolder if subfolder else path) / gguf_file
        if not file.is_file():
            raise FileNotFoundError(f"GGUF file {file} does not exist")
        return file
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path}: a checkpoint given as a file must be a .gguf; pass the folder of a "
                             "safetensors checkpoint instead")
        return path
    folder = path / subfolder if subfolder else path
    if not folder.is_dir() or (folder / "config.json").exists():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise ValueError(f"{folder} holds several GGUF files ({', '.join(p.name for p in found)}); "
                         "choose one with gguf_file=")
    return found[0] if found else None


def _download(repo_id: str, gguf_file: str, subfolder: str | None) -> Path:
    try:
        import huggingface_hub

        return Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=gguf_file, subfolder=subfolder))
    except Exception as e:  # offline, gated, unknown repo or file: the message says which
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and {gguf_file!r} could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Pass a local .gguf file instead.") from e
