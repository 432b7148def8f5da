"""Where MuseTalk's weights live under a models folder, what is missing, and how to fetch them.

The layout is the one MuseTalk's own download script produces, so an existing ``models/`` folder
works as it is::

    musetalkV15/musetalk.json + unet.pth      (v1.5 UNet; v1: musetalk/musetalk.json + pytorch_model.bin)
    sd-vae/config.json + diffusion_pytorch_model.{bin,safetensors}
    whisper/config.json + preprocessor_config.json + {pytorch_model.bin,model.safetensors}
    face-parse-bisent/79999_iter.pth + resnet18-5c106cde.pth      (optional: blending masks)
    dwpose/dw-ll_ucoco_384.pth                                      (optional: face landmarks)
    taesd/config.json + diffusion_pytorch_model.{bin,safetensors}  (optional: the fast decoder)

This module imports nothing heavy (no torch): ``musetalk-stream models check`` runs without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

VERSIONS = ("v15", "v1")


@dataclass(frozen=True)
class ModelLayout:
    """Paths of every weight file below ``root``."""

    root: Path
    version: str = "v15"

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"unknown MuseTalk version {self.version!r}; expected one of {VERSIONS}")

    @property
    def unet_config(self) -> Path:
        folder = "musetalkV15" if self.version == "v15" else "musetalk"
        return self.root / folder / "musetalk.json"

    @property
    def unet_weights(self) -> Path:
        if self.version == "v15":
            return self.root / "musetalkV15" / "unet.pth"
        return self.root / "musetalk" / "pytorch_model.bin"

    @property
    def vae_dir(self) -> Path:
        return self.root / "sd-vae"

    @property
    def taesd_dir(self) -> Path:
        return self.root / "taesd"

    @property
    def whisper_dir(self) -> Path:
        return self.root / "whisper"

    @property
    def face_parse_weights(self) -> Path:
        return self.root / "face-parse-bisent" / "79999_iter.pth"

    @property
    def resnet_weights(self) -> Path:
        return self.root / "face-parse-bisent" / "resnet18-5c106cde.pth"

    @property
    def dwpose_weights(self) -> Path:
        return self.root / "dwpose" / "dw-ll_ucoco_384.pth"

    def has_face_parsing(self) -> bool:
        return self.face_parse_weights.is_file() and self.resnet_weights.is_file()

    def has_taesd(self) -> bool:
        return not _diffusers_dir_problems(self.taesd_dir)


class MissingModelsError(FileNotFoundError):
    """The models folder lacks files; ``problems`` names each one."""

    def __init__(self, root: Path, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n  ".join(problems)
        super().__init__(
            f"MuseTalk models are incomplete under {root}:\n  {lines}\n"
            "Fetch them with inference.musetalk.download_models(root) (needs internet)."
        )


def _one_of(folder: Path, names: tuple[str, ...]) -> str | None:
    if any((folder / name).is_file() for name in names):
        return None
    return f"missing {folder / names[0]}" + (f" (or {', '.join(names[1:])})" if len(names) > 1 else "")


def _diffusers_dir_problems(folder: Path) -> list[str]:
    found = [
        _one_of(folder, ("config.json",)),
        _one_of(folder, ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors")),
    ]
    return [p for p in found if p]


def check_models(
    root: str | Path,
    *,
    version: str = "v15",
    face_parsing: bool = False,
    taesd: bool = False,
) -> list[str]:
    """Problems with the layout under ``root``, one line per missing file; empty when usable.

    Face parsing and TAESD are optional (a geometric mask and the sd-vae decoder stand in);
    pass ``face_parsing=True`` or ``taesd=True`` to require them."""
    layout = ModelLayout(Path(root), version)
    problems: list[str] = []
    for path in (layout.unet_config, layout.unet_weights):
        if not path.is_file():
            problems.append(f"missing {path}")
    problems += _diffusers_dir_problems(layout.vae_dir)
    problems += [
        p
        for p in (
            _one_of(layout.whisper_dir, ("config.json",)),
            _one_of(layout.whisper_dir, ("preprocessor_config.json",)),
            _one_of(layout.whisper_dir, ("pytorch_model.bin", "model.safetensors")),
        )
        if p
    ]
    if face_parsing:
        problems += [f"missing {p}" for p in (layout.face_parse_weights, layout.resnet_weights) if not p.is_file()]
    if taesd:
        problems += _diffusers_dir_problems(layout.taesd_dir)
    return problems


@dataclass(frozen=True)
class ModelFile:
    """One file the layout expects: where (with any accepted alternative names), whether MuseTalk
    needs it, what it is for, and (optional files) what its absence costs."""

    path: Path
    required: bool
    purpose: str
    present: bool
    alternatives: tuple[str, ...] = ()
    without: str = ""


FACE_PARSING_COST = "blending masks fall back to an ellipse over the lower face (the jaw is not parsed)"
DWPOSE_COST = "face boxes come from the offline face-box fallback (a Haar cascade, refined), not from landmarks"
TAESD_COST = "decoder='taesd' (the fast tiny decoder) cannot be chosen; sd-vae, the default, decodes"


def _file(
    folder: Path, names: tuple[str, ...], purpose: str, required: bool = True, without: str = ""
) -> ModelFile:
    present = any((folder / name).is_file() for name in names)
    return ModelFile(folder / names[0], required, purpose, present, names[1:], without)


def model_report(root: str | Path, *, version: str = "v15") -> list[ModelFile]:
    """Every file of the layout under ``root``, required ones first, each marked present or not."""
    layout = ModelLayout(Path(root), version)
    name = "v1.5" if version == "v15" else version
    unet = layout.unet_weights.parent
    diffusers = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors")
    parsing = layout.face_parse_weights.parent
    return [
        _file(unet, (layout.unet_config.name,), f"MuseTalk {name} UNet configuration"),
        _file(unet, (layout.unet_weights.name,), f"MuseTalk {name} UNet weights"),
        _file(layout.vae_dir, ("config.json",), "sd-vae configuration"),
        _file(layout.vae_dir, diffusers, "sd-vae weights (encoder and decoder)"),
        _file(layout.whisper_dir, ("config.json",), "whisper-tiny configuration"),
        _file(layout.whisper_dir, ("preprocessor_config.json",), "whisper-tiny feature extractor"),
        _file(layout.whisper_dir, ("pytorch_model.bin", "model.safetensors"), "whisper-tiny weights"),
        _file(parsing, (layout.face_parse_weights.name,), "face parsing (BiSeNet)", False, FACE_PARSING_COST),
        _file(parsing, (layout.resnet_weights.name,), "face parsing's ResNet-18 trunk", False, FACE_PARSING_COST),
        _file(layout.dwpose_weights.parent, (layout.dwpose_weights.name,), "DWPose face landmarks", False, DWPOSE_COST),
        _file(layout.taesd_dir, ("config.json",), "TAESD configuration", False, TAESD_COST),
        _file(layout.taesd_dir, diffusers, "TAESD weights", False, TAESD_COST),
    ]


# (repository, files, folder below root) as MuseTalk's download script fetches them.
_DOWNLOADS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("TMElyralab/MuseTalk", ("musetalkV15/musetalk.json", "musetalkV15/unet.pth"), ""),
    ("stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.bin"), "sd-vae"),
    ("openai/whisper-tiny", ("config.json", "pytorch_model.bin", "preprocessor_config.json"), "whisper"),
    ("ManyOtherFunctions/face-parse-bisent", ("79999_iter.pth", "resnet18-5c106cde.pth"), "face-parse-bisent"),
    ("yzd-v/DWPose", ("dw-ll_ucoco_384.pth",), "dwpose"),
)
_TAESD = ("madebyollin/taesd", ("config.json", "diffusion_pytorch_model.safetensors"), "taesd")


def download_models(root: str | Path, *, taesd: bool = False, v1: bool = False) -> Path:
    """Fetch the weights into ``root`` in the layout above (needs internet and huggingface_hub)."""
    from huggingface_hub import hf_hub_download

    root = Path(root)
    downloads = list(_DOWNLOADS)
    if v1:
        downloads.append(("TMElyralab/MuseTalk", ("musetalk/musetalk.json", "musetalk/pytorch_model.bin"), ""))
    if taesd:
        downloads.append(_TAESD)
    for repo, files, folder in downloads:
        for name in files:
            hf_hub_download(repo_id=repo, filename=name, local_dir=root / folder if folder else root)
    return root
