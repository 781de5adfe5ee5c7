"""The one config object of the project: NiN's architecture plus its input contract.

It is saved in every checkpoint (as a plain dict), written into the ONNX metadata and the
model card, and read back by the server. Pure Python on purpose: the server imports nothing
from torch, and the preprocessing it applies comes from here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


# NiN's smallest input: an 11x11 stride-4 convolution, then three 3x3 stride-2 max-pools, each
# needing at least 3x3 (67 -> 15 -> 7 -> 3 -> 1). Smaller inputs fail inside the last pool.
MIN_IMAGE_SIZE = 67


@dataclass(frozen=True)
class NiNConfig:
    """Architecture (d2l chapter 8.3 by default) and the input contract it was trained on."""

    in_channels: int = 1
    num_classes: int = 10
    # 1x1 convolutions after the k x k one in every block; d2l uses 2 (its exercise asks about 0-3).
    num_1x1: int = 2
    # BatchNorm after every convolution except the classifier's last one (not in the textbook).
    batch_norm: bool = False
    dropout: float = 0.5
    # Multiplies the hidden widths 96/256/384 (the classifier block keeps num_classes channels).
    width: float = 1.0
    # The classifier: 0 = the textbook's one NiN block straight from 384 channels to num_classes;
    # N > 0 = two steps: a 3x3 NiN block 384 -> N, then a block of 1x1 convs N -> num_classes.
    head_width: int = 0

    # Input contract: what a client sends and how it becomes the tensor the network sees.
    image_size: int = 224
    source_size: int = 28
    # PIL.Image.resize(..., Image.BILINEAR) for uploads; torch bilinear, align_corners=False,
    # no antialias, rounded to uint8, in training: the two agree to within one grey level.
    interpolation: str = "bilinear"
    # pixel / 255, then (x - mean) / std; Fashion-MNIST training-set statistics.
    scale: float = 1.0 / 255.0
    mean: float = 0.2860
    std: float = 0.3530
    class_names: tuple[str, ...] = field(default=FASHION_MNIST_CLASSES)

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE} (NiN's three 3x3/2 max-pools after its "
                             f"11x11/4 convolution), got {self.image_size}")
        for name in ("in_channels", "num_classes", "source_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.scale > 0 and self.std > 0):
            raise ValueError(f"scale and std must be > 0, got {self.scale} and {self.std}")
        if not 0 <= self.num_1x1 <= 3:
            raise ValueError(f"num_1x1 must be 0..3, got {self.num_1x1}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head_width < 0:
            raise ValueError(f"head_width must be >= 0, got {self.head_width}")
        if self.width <= 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{len(self.class_names)} class names for {self.num_classes} classes"
            )
        if self.interpolation != "bilinear":
            raise ValueError(f"only bilinear resizing is implemented, got {self.interpolation!r}")
        # A checkpoint stores class_names as a list; keep the frozen dataclass hashable.
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def widths(self) -> tuple[int, int, int]:
        """Hidden channel counts of the first three blocks."""
        return tuple(max(1, round(c * self.width)) for c in (96, 256, 384))  # type: ignore[return-value]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["class_names"] = list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NiNConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a mapping of NiNConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown NiNConfig keys: {sorted(unknown)}")
        return cls(**d)

    def input_contract(self) -> dict:
        """The preprocessing facts a client and the server need, nothing about the layers."""
        return {
            "image_size": self.image_size,
            "channels": self.in_channels,
            "source_size": self.source_size,
            "interpolation": self.interpolation,
            "scale": self.scale,
            "mean": self.mean,
            "std": self.std,
            "dtype": "float32",
            "layout": "NCHW",
        }
