"""Converts a published metric-network checkpoint (a torch pickle) to a safetensors folder, once, and
checks that it loads strictly into the Flax port.

The reconstruction metrics read five networks; four ship as torch pickles:

    alexnet       torchvision  alexnet-owt-7be5be79.pth           (AlexNet_Weights.IMAGENET1K_V1)
    inception     torchvision  inception_v3_google-0cc3c7bd.pth   (Inception_V3_Weights.IMAGENET1K_V1)
    efficientnet  torchvision  efficientnet_b1-c27df63c.pth       (EfficientNet_B1_Weights.IMAGENET1K_V2)
    swav          SwAV         swav_800ep_pretrain.pth.tar        (facebookresearch/swav, torch.hub resnet50)

(CLIP ViT-L/14 is read from the Hugging Face folder ``openai/clip-vit-large-patch14``.)
Reading a pickle needs torch; nvl_jax never imports it otherwise. SwAV's checkpoint was saved
from DistributedDataParallel, so its keys start with ``module.``; that prefix is dropped, as SwAV's
own ``torch.hub`` loader does.

    python -m nvl_jax.models.convert_feature_nets swav swav_800ep_pretrain.pth.tar ckpt/swav
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

WEIGHTS_NAME = "model.safetensors"
NETWORKS = ("alexnet", "inception", "efficientnet", "swav")
DDP_PREFIX = "module."


def _load_model(network: str, folder: Path):
    """Loads ``folder`` into ``network``'s Flax port; raises ``CheckpointMismatchError`` on any mismatch."""
    from nvl_jax.models.alexnet import AlexNet
    from nvl_jax.models.efficientnet import EfficientNet
    from nvl_jax.models.inception import InceptionV3
    from nvl_jax.models.resnet import ResNet

    models = {"alexnet": AlexNet, "inception": InceptionV3, "efficientnet": EfficientNet, "swav": ResNet}
    return models[network].from_pretrained(folder)


def read_state_dict(src: str | Path) -> dict[str, np.ndarray]:
    """The float tensors of a torch checkpoint, ``module.`` prefixes dropped; a ``{"state_dict": ...}``
    wrapper is unwrapped."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading a .pth checkpoint needs torch: pip install 'nvl_jax[convert]'") from e
    state = torch.load(src, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{src}: expected a state dict of tensors, got {type(state).__name__}")
    return {key.removeprefix(DDP_PREFIX): value.detach().cpu().contiguous().numpy() for key, value in state.items()}


def convert(network: str, src: str | Path, dst: str | Path) -> Path:
    """Writes ``dst/model.safetensors`` from ``src`` and proves it loads into ``network``'s port."""
    if network not in NETWORKS:
        raise ValueError(f"unknown network {network!r}; expected one of {NETWORKS}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(read_state_dict(src), dst / WEIGHTS_NAME, metadata={"format": "pt", "network": network})
    _load_model(network, dst)
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("network", choices=NETWORKS, help="which metric network the checkpoint holds")
    parser.add_argument("src", help="the published .pth / .pth.tar checkpoint")
    parser.add_argument("dst", help="folder to write model.safetensors into (pass it to the metrics)")
    args = parser.parse_args(argv)
    print(f"wrote {convert(args.network, args.src, args.dst) / WEIGHTS_NAME}; it loads into the {args.network} port")


if __name__ == "__main__":
    main()
