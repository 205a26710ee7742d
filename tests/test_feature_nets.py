"""The metric networks (AlexNet, InceptionV3, EfficientNet-B1, ResNet-50) against pytorchcv's independent
PyTorch implementations, with random weights.

torchvision itself does not import on these machines (its wheel needs CUDA torch), and timm and
pytorch-fid import torchvision. pytorchcv's model modules import only torch; its ``alexnetb``,
``inceptionv3``, ``efficientnet_b1`` (``tf_mode=False``) and ``resnet50b`` are the torchvision
architectures under other module names. Each test renames the reference's state dict to torchvision's
key names (the ``*_to_torchvision`` functions below: the only conversion), saves it as safetensors,
loads it through our key table and compares the features the metrics read, at the protocol's sizes.
pytorchcv ends ResNet and InceptionV3 with a fixed-size average pool; the reference's ``avgpool``
here is the spatial mean of the last block, which is torchvision's ``AdaptiveAvgPool2d(1)``.
"""

import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from nvl_jax.models.alexnet import AlexNet
from nvl_jax.models.efficientnet import EfficientNet, EfficientNetConfig
from nvl_jax.models.hf_loader import CheckpointMismatchError
from nvl_jax.models.inception import InceptionV3
from nvl_jax.models.resnet import ResNet

pytorchcv_alexnet = pytest.importorskip("pytorchcv.models.alexnet")
pytorchcv_efficientnet = pytest.importorskip("pytorchcv.models.efficientnet")
pytorchcv_inception = pytest.importorskip("pytorchcv.models.inceptionv3")
pytorchcv_resnet = pytest.importorskip("pytorchcv.models.resnet")

REL_TOL = 1e-4


def randomize_batch_norms(model: torch.nn.Module) -> None:
    """torch starts batch norms at the identity; random statistics make the comparison see them. Scales
    below 1 keep the random deep nets' activations O(1), so float32 rounding is not amplified."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def save_checkpoint(state: dict[str, np.ndarray], folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, folder / "model.safetensors")


def images(size: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)


def torch_forward(module, x: np.ndarray) -> np.ndarray:
    """``[batch, height, width, 3]`` -> the module's output, channels first as torch gives it."""
    with torch.no_grad():
        return module(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


def jax_forward(model, x: np.ndarray):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x)


def assert_close(ours, reference: np.ndarray) -> None:
    """Largest difference within ``REL_TOL`` of the largest reference feature."""
    ours = np.asarray(ours)
    assert ours.shape == reference.shape
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < REL_TOL, f"max error {error:.2e} of the largest feature"


def alexnet_to_torchvision(key: str) -> str:
    """pytorchcv ``alexnetb`` -> torchvision ``alexnet`` key."""
    convs = {"stage1.unit1": 0, "stage2.unit1": 3, "stage3.unit1": 6, "stage3.unit2": 8, "stage3.unit3": 10}
    match = re.fullmatch(r"features\.(stage\d\.unit\d)\.conv\.(weight|bias)", key)
    if match:
        return f"features.{convs[match[1]]}.{match[2]}"
    classifier = {"output.fc1.fc": "classifier.1", "output.fc2.fc": "classifier.4", "output.fc3": "classifier.6"}
    head, leaf = key.rsplit(".", 1)
    return f"{classifier[head]}.{leaf}"


def resnet_to_torchvision(key: str) -> str:
    """pytorchcv ``resnet50b`` -> torchvision ``resnet50`` key."""
    key = key.replace("features.init_block.conv.conv.", "conv1.").replace("features.init_block.conv.bn.", "bn1.")
    match = re.fullmatch(r"features\.stage(\d)\.unit(\d+)\.(.*)", key)
    if match:
        rest = re.sub(r"body\.conv(\d)\.conv\.", r"conv\1.", match[3])
        rest = re.sub(r"body\.conv(\d)\.bn\.", r"bn\1.", rest)
        rest = rest.replace("identity_conv.conv.", "downsample.0.").replace("identity_conv.bn.", "downsample.1.")
        key = f"layer{match[1]}.{int(match[2]) - 1}.{rest}"
    return key.replace("output.", "fc.")


def efficientnet_to_torchvision(keys: list[str], config: EfficientNetConfig) -> dict[str, str]:
    """pytorchcv ``efficientnet_b1`` -> torchvision ``efficientnet_b1`` keys.

    pytorchcv merges each stride-1 stage into the one before it; its units are numbered within those
    merged stages, torchvision's blocks within its seven stages, so blocks are matched in order."""
    units = list(dict.fromkeys(re.match(r"features\.(stage\d+\.unit\d+)\.", k)[1] for k in keys
                               if ".stage" in k))
    blocks = [f"features.{s + 1}.{b}" for s, stage in enumerate(config.stages()) for b in range(stage[5])]
    assert len(units) == len(blocks)
    unit_to_block = dict(zip(units, blocks))
    parts = {"dw_conv": "block.0", "se": "block.1", "pw_conv": "block.2",
             "conv1": "block.0", "conv2": "block.1", "conv3": "block.3"}
    mapping = {}
    for key in keys:
        name = key.replace(".conv.weight", ".0.weight").replace(".bn.", ".1.")
        name = name.replace("features.init_block.conv.", "features.0.").replace("features.final_block.", "features.8.")
        name = name.replace("output.fc.", "classifier.1.")
        match = re.fullmatch(r"features\.(stage\d+\.unit\d+)\.(\w+)\.(.*)", name)
        if match:
            unit, part, rest = match.groups()
            has_expand = f"features.{unit}.dw_conv.conv.weight" not in keys
            target = "block.2" if part == "se" and has_expand else parts[part]
            rest = rest.replace("conv1.", "fc1.").replace("conv2.", "fc2.") if part == "se" else rest
            name = f"{unit_to_block[unit]}.{target}.{rest}"
        mapping[key] = name
    return mapping


def inception_to_torchvision(key: str) -> str:
    """pytorchcv ``inceptionv3`` -> torchvision ``inception_v3`` key."""
    stem = {f"conv{i + 1}": name for i, name in enumerate(
        ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"])}
    match = re.fullmatch(r"features\.init_block\.(conv\d)\.(.*)", key)
    if match:
        return f"{stem[match[1]]}.{match[2]}"
    if key.startswith("output.fc."):
        return key.replace("output.fc.", "fc.")
    match = re.fullmatch(r"features\.stage(\d)\.unit(\d)\.branches\.(branch\d)\.(.*)", key)
    stage, unit, branch, rest = int(match[1]), int(match[2]), match[3], match[4]
    block = {1: ["Mixed_5b", "Mixed_5c", "Mixed_5d"], 2: ["Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
             3: ["Mixed_7a", "Mixed_7b", "Mixed_7c"]}[stage][unit - 1]
    kind = {"5b": "A", "5c": "A", "5d": "A", "6a": "B", "7a": "D", "7b": "E", "7c": "E"}.get(block[-2:], "C")
    names = {
        "A": {"branch1": ["branch1x1"], "branch2": ["branch5x5_1", "branch5x5_2"],
              "branch3": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"], "branch4": ["branch_pool"]},
        "B": {"branch1": ["branch3x3"], "branch2": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]},
        "C": {"branch1": ["branch1x1"], "branch2": [f"branch7x7_{i}" for i in (1, 2, 3)],
              "branch3": [f"branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5)], "branch4": ["branch_pool"]},
        "D": {"branch1": ["branch3x3_1", "branch3x3_2"], "branch2": [f"branch7x7x3_{i}" for i in (1, 2, 3, 4)]},
        "E": {"branch1": ["branch1x1"], "branch2": ["branch3x3_1"], "branch3": ["branch3x3dbl_1", "branch3x3dbl_2"],
              "branch4": ["branch_pool"]},
    }[kind][branch]
    split = {"branch2": ("branch3x3_2a", "branch3x3_2b"), "branch3": ("branch3x3dbl_3a", "branch3x3dbl_3b")}
    match = re.fullmatch(r"conv_list\.conv(\d)\.(.*)", rest)
    if match:
        return f"{block}.{names[int(match[1]) - 1]}.{match[2]}"
    match = re.fullmatch(r"conv(1x3|3x1)\.(.*)", rest)
    if match:
        return f"{block}.{split[branch][match[1] == '3x1']}.{match[2]}"
    return f"{block}.{names[0]}.{rest.removeprefix('conv.')}"


def test_alexnet_features_match_pytorchcv(tmp_path):
    torch.manual_seed(0)
    reference = pytorchcv_alexnet.alexnetb().eval()
    save_checkpoint({alexnet_to_torchvision(k): v.numpy() for k, v in reference.state_dict().items()}, tmp_path)
    x = images(256)
    ours = jax_forward(AlexNet.from_pretrained(tmp_path), x)
    stages = reference.features
    with torch.no_grad():
        # features.4: the second conv's ReLU; features.11: the fifth's (before the last max pool).
        features_4 = stages.stage2.unit1(stages.stage1(torch.from_numpy(x).permute(0, 3, 1, 2)))
        features_11 = stages.stage3.unit3(stages.stage3.unit2(stages.stage3.unit1(stages.stage2.pool2(features_4))))
    assert_close(ours["features.4"], features_4.permute(0, 2, 3, 1).numpy())
    assert_close(ours["features.11"], features_11.permute(0, 2, 3, 1).numpy())


def test_resnet50_avgpool_matches_pytorchcv(tmp_path):
    torch.manual_seed(0)
    reference = pytorchcv_resnet.resnet50b().eval()
    randomize_batch_norms(reference)
    save_checkpoint({resnet_to_torchvision(k): v.numpy() for k, v in reference.state_dict().items()}, tmp_path)
    x = images(224)
    expected = torch_forward(reference.features[:-1], x).mean((2, 3))
    assert_close(jax_forward(ResNet.from_pretrained(tmp_path), x), expected)


def test_efficientnet_b1_avgpool_matches_pytorchcv(tmp_path):
    torch.manual_seed(0)
    reference = pytorchcv_efficientnet.efficientnet_b1().eval()
    randomize_batch_norms(reference)
    state = reference.state_dict()
    names = efficientnet_to_torchvision(list(state), EfficientNetConfig.b1())
    save_checkpoint({names[k]: v.numpy() for k, v in state.items()}, tmp_path)
    x = images(255, batch=1)
    expected = torch_forward(reference.features, x).reshape(1, -1)
    assert_close(jax_forward(EfficientNet.from_pretrained(tmp_path), x), expected)


def test_inception_v3_avgpool_matches_pytorchcv(tmp_path):
    torch.manual_seed(0)
    reference = pytorchcv_inception.inceptionv3().eval()
    randomize_batch_norms(reference)
    save_checkpoint({inception_to_torchvision(k): v.numpy() for k, v in reference.state_dict().items()}, tmp_path)
    x = images(342, batch=1)
    # torchvision's Inception3._transform_input, which its pretrained model runs first.
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    transformed = (x * (std / 0.5) + (mean - 0.5) / 0.5).astype(np.float32)
    expected = torch_forward(reference.features[:-1], transformed).mean((2, 3))
    assert_close(jax_forward(InceptionV3.from_pretrained(tmp_path), x), expected)


def test_loading_is_strict(tmp_path):
    torch.manual_seed(0)
    state = {alexnet_to_torchvision(k): v.numpy() for k, v in pytorchcv_alexnet.alexnetb().state_dict().items()}
    del state["features.8.bias"]
    state["features.13.weight"] = np.zeros((1,), np.float32)
    save_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)conv4.bias.*features\.13\.weight"):
        AlexNet.from_pretrained(tmp_path)


def test_missing_folder_names_the_converter(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_feature_nets"):
        ResNet.from_pretrained(tmp_path / "absent")


def test_converter_reads_swav_checkpoint(tmp_path):
    """SwAV's published file: a DistributedDataParallel state dict (``module.`` prefixes) holding its
    projection head and prototypes besides the torchvision ResNet-50 backbone."""
    from nvl_jax.models import convert_feature_nets

    torch.manual_seed(0)
    reference = pytorchcv_resnet.resnet50b().eval()
    state = {f"module.{resnet_to_torchvision(k)}": v for k, v in reference.state_dict().items()
             if not k.startswith("output.")}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    state["module.prototypes.weight"] = torch.zeros(3000, 128)
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    convert_feature_nets.main(["swav", str(tmp_path / "swav_800ep_pretrain.pth.tar"), str(tmp_path / "swav")])
    model = ResNet.from_pretrained(tmp_path / "swav")
    np.testing.assert_array_equal(np.asarray(model.layer4[2].conv3.kernel[...]),
                                  state["module.layer4.2.conv3.weight"].numpy().transpose(2, 3, 1, 0))
