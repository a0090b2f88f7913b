"""Weight files dast knows by their SHA-256, and where each is published.

``dast convert`` hashes its input files and names the ones listed here, so a user sees
which file they actually have. Where a publisher gives only the torch.hub file name
(``name-<first 8 hex digits of the SHA-256>.pth``), the entry holds that prefix and a
file is recognised by it; where a full SHA-256 has been published, the full value must
match. docs/weights.md lists the same files with their sources.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownWeights:
    """One published weight file."""

    file_name: str
    description: str
    url: str
    sha256_prefix: str  # the hex digits in the file name (torch.hub convention)
    sha256: str | None = None  # the full SHA-256, where one is published
    norm: str | None = None  # the input normalisation the weights were trained with

    def matches(self, digest: str) -> bool:
        """Whether a file with SHA-256 ``digest`` is this one (full hash when known, else prefix)."""
        d = digest.lower()
        return d == self.sha256 if self.sha256 is not None else d.startswith(self.sha256_prefix)


KNOWN_WEIGHTS: tuple[KnownWeights, ...] = (
    KnownWeights(
        file_name="DeepLab_resnet_pretrained_init-f81d91e8.pth",
        description="DeepLab-v2 ResNet-101 init (ImageNet + MS-COCO), used by AdaptSegNet and DAST",
        url="http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth",
        sha256_prefix="f81d91e8",
        norm="caffe",
    ),
    KnownWeights(
        file_name="vgg16-397923af.pth",
        description="torchvision VGG-16 ImageNet weights",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        sha256_prefix="397923af",
        sha256="397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0",
        norm="imagenet",
    ),
    KnownWeights(
        file_name="resnet101-63fe2227.pth",
        description="torchvision ResNet-101 ImageNet weights (IMAGENET1K_V1)",
        url="https://download.pytorch.org/models/resnet101-63fe2227.pth",
        sha256_prefix="63fe2227",
        sha256="63fe2227b86e8f1f2063f43a75c84d195911b6a0eace650907dd3dc62dd49a0a",
        norm="imagenet",
    ),
    KnownWeights(
        file_name="resnet101-5d3b4d8f.pth",
        description="torchvision ResNet-101 ImageNet weights (torchvision < 0.13 file)",
        url="https://download.pytorch.org/models/resnet101-5d3b4d8f.pth",
        sha256_prefix="5d3b4d8f",
        norm="imagenet",
    ),
    KnownWeights(
        file_name="vgg16-00b39a1b.pth",
        description="caffe VGG-16 converted to PyTorch (jcjohnson/pytorch-vgg)",
        url="https://web.eecs.umich.edu/~justincj/models/vgg16-00b39a1b.pth",
        sha256_prefix="00b39a1b",
        norm="caffe",
    ),
)


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file as 64 lowercase hex digits, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def identify(digest: str, known: Sequence[KnownWeights] = KNOWN_WEIGHTS) -> KnownWeights | None:
    """The known file with SHA-256 ``digest``, or None."""
    for entry in known:
        if entry.matches(digest):
            return entry
    return None


def describe_match(entry: KnownWeights) -> str:
    """``recognised: <description> (<file name>), <how it was matched>``."""
    how = (
        "full SHA-256 matches"
        if entry.sha256 is not None
        else f"SHA-256 starts with {entry.sha256_prefix} as its file name says (no full hash is published)"
    )
    return f"recognised: {entry.description} ({entry.file_name}), {how}"


@dataclass(frozen=True)
class FileProvenance:
    """A weight file's SHA-256 and, if it is a known file, which one."""

    path: Path
    sha256: str
    known: KnownWeights | None

    def lines(self) -> list[str]:
        """What ``dast convert`` prints about the file."""
        out = [f"sha256 of {self.path.name}: {self.sha256}"]
        if self.known is not None:
            out.append(describe_match(self.known))
        else:
            out.append(
                f"not a file dast knows (docs/weights.md lists them); keep this SHA-256 to identify "
                f"{self.path.name} later"
            )
        return out

    def to_dict(self) -> dict[str, str | None]:
        """For a converted checkpoint's JSON: file name, SHA-256, recognised file name."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "recognised": self.known.file_name if self.known is not None else None,
        }


def inspect_file(path: str | Path, known: Sequence[KnownWeights] = KNOWN_WEIGHTS) -> FileProvenance:
    """Hash ``path`` and look it up in ``known``."""
    p = Path(path)
    digest = file_sha256(p)
    return FileProvenance(p, digest, identify(digest, known))


def random_init_warning(arch: str, init: str | None) -> str | None:
    """The warning for training a ``resnet101`` / ``vgg16`` model without ``model.init``
    (None for the small demo backbone, which is meant to start from scratch, or with an init)."""
    if init:
        return None
    if arch == "resnet101":
        source = "DeepLab_resnet_pretrained_init-f81d91e8.pth"
    elif arch == "vgg16":
        source = "vgg16-397923af.pth"
    else:
        return None
    return (
        f"model.init is not set: the {arch} backbone starts from random weights, not ImageNet, and will not "
        f"reach the paper's numbers; convert an init once with 'dast convert imagenet --weights {source} "
        f"--arch {arch} --out weights/{arch}_init.safetensors' and set model.init to it (docs/weights.md)"
    )
