"""Typed settings of a fine-tuning run, read from a TOML/YAML file plus ``--set a.b=c`` overrides.

The tree (every key can be set in a file or with ``--set``)::

    model.backend / name_or_path / revision / dtype     which encoder (see finetune.backends)
    data.source / format / split / images_dir / exclude_images_from / max_items / num_workers
    taxonomy.ranks / image_column / common_name_column / style / template / root_text
          (data.format=taxonomy: a taxonomy table, see finetune.taxonomy_data)
    loss.name ("re" | "ec" | "rcme" | "level") / weights / ec_margin / ec_epsilon / rcme_alpha / rcme_beta / towers
    optim.lr / batch_size / epochs / max_steps / betas / eps / weight_decay / scheduler /
          gradient_accumulation_steps / max_grad_norm
    run.output_dir / seed / mixed_precision / checkpoint_every / save_total_limit / resume / cpu
    eval.test_source / images_dir / variant / hyperlex / wordnet_dir / taxonomy_table /
          taxonomy_images / batch_size / image_cache  (Prefect flow)

Settings left empty (``None``) take the paper default of the chosen loss when the run starts
(:func:`resolve`): RE and EC use the HierarCaps recipe (AdamW, lr 1e-7, batch 8, constant
schedule, text tower only), RCME the RCME recipe (AdamW β = (0.9, 0.98), ε = 1e-6, lr 1e-5,
batch 32, one-cycle schedule, both towers). The level-restricted contrastive loss (``level``,
BioCLIP-HC) takes the RCME recipe too: it is the same kind of cross-modal fine-tuning of both
towers, and BioCLIP-HC's own recipe (lr 1e-4 with warm-up and cosine decay, weight decay 0.2,
batch 32K on TreeOfLife-10M) is made for another scale. The resolved tree is written to ``run.json``.

The file and override machinery (unknown keys and wrong types are errors that name the key and
where it came from) is :mod:`hierarcaps.settings`'.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from hierarcaps.settings import (
    SettingsError,
    apply_mapping,
    apply_override,
    read_settings_file,
    to_dict,
)

__all__ = [
    "ModelSettings",
    "DataSettings",
    "LossSettings",
    "OptimSettings",
    "RunSettings",
    "EvalSettings",
    "TaxonomySettings",
    "FinetuneSettings",
    "SettingsError",
    "load_settings",
    "resolve",
    "to_dict",
    "from_dict",
    "LOSSES",
    "IMAGE_LOSSES",
]

LOSSES = ("re", "ec", "rcme", "level")
# Losses that contrast texts with the item's image: they need data.images_dir and an image tower.
IMAGE_LOSSES = ("rcme", "level")
SCHEDULERS = ("constant", "one-cycle")
MIXED_PRECISION = ("no", "fp16", "bf16")
DATA_FORMATS = ("auto", "hierarcaps", "taxonomy")
TAXONOMY_STYLES = ("taxonomic", "name", "taxonomic+common")


@dataclass
class ModelSettings:
    """The encoder to align: a backend kind and a hub id, folder or open_clip name."""

    backend: str = "hf-clip"  # hf-clip | open-clip | text
    name_or_path: str = "openai/clip-vit-base-patch32"
    revision: str | None = None
    dtype: str = "auto"  # weights dtype: auto | float32 | bfloat16 | float16


@dataclass
class DataSettings:
    """Where the train items come from (see :func:`finetune.data.load_train_rows`)."""

    source: str = ""  # DatasetDict folder, Hub dataset id, release CSV, or taxonomy table (CSV/Parquet)
    format: str = "auto"  # auto | hierarcaps | taxonomy; auto: a table with the taxonomy.ranks columns is a taxonomy
    split: str = "train"
    images_dir: str | None = None  # rcme, level: a fetch-images folder, or image_ref base names are looked up here
    exclude_images_from: list[str] = field(default_factory=list)  # release CSVs / folders whose images to leave out
    max_items: int | None = None
    num_workers: int = 0


@dataclass
class TaxonomySettings:
    """How a taxonomy table becomes chains of rank texts (data.format=taxonomy; finetune.taxonomy_data)."""

    ranks: list[str] = field(
        default_factory=lambda: ["kingdom", "phylum", "class", "order", "family", "genus", "species"]
    )  # general to specific; "class" also matches a "cls" column
    image_column: str = "filepath"  # image path or reference, looked up in data.images_dir
    common_name_column: str = "common_name"  # used by style taxonomic+common; may be absent
    style: str = "taxonomic"  # taxonomic ("Animalia Chordata ...") | name (the rank's own name) | taxonomic+common
    template: str = "a photo of {}."  # wraps every rank text
    root_text: str = "Eukarya"  # the root's text (RCME's released code), instead of ""


@dataclass
class LossSettings:
    """Which loss and its constants (SPEC section 3)."""

    name: str = "re"  # re | ec | rcme | level
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 10.0])  # RE/EC: mean, minimax, reg
    ec_margin: float = 0.0
    ec_epsilon: float = 0.05
    rcme_alpha: float = math.pi / 2
    rcme_beta: float = 0.1
    towers: str | None = None  # text | both; None: text for re/ec, both for rcme/level


@dataclass
class OptimSettings:
    """AdamW and schedule; ``None`` takes the chosen loss's paper default."""

    lr: float | None = None
    batch_size: int | None = None  # per device
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops early when reached
    betas: list[float] | None = None
    eps: float | None = None
    weight_decay: float = 0.01
    scheduler: str | None = None  # constant | one-cycle
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None


@dataclass
class RunSettings:
    """Output, seeding, precision and checkpointing."""

    output_dir: str = "runs/finetune"
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    checkpoint_every: int = 500  # optimizer steps; a checkpoint is also written at the end
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume: bool = False
    cpu: bool = False  # force the CPU even where a GPU exists


@dataclass
class EvalSettings:
    """Evaluation before and after training (Prefect flow ``finetune``); an empty input skips its benchmark."""

    test_source: str = ""  # curated test CSV, or a dataset folder with a test split (retrieval, retention)
    images_dir: str = ""
    variant: str = "released"  # HierarCaps retrieval: the released evaluator's semantics, or "paper"
    hyperlex: str = ""  # a HyperLex-format file (lexical entailment)
    wordnet_dir: str = ""  # a WordNet 3.0 dict folder, e.g. /usr/share/wordnet (hypernymy ordering)
    taxonomy_table: str = ""  # a taxonomy table of test images (read with the taxonomy.* settings)
    taxonomy_images: str = ""  # the folder its image column is relative to
    batch_size: int | None = None  # texts per model call; None: 256 on a GPU, 64 on the CPU
    image_cache: str = ""  # image-embedding cache folder; empty: <run.output_dir>/eval/image-cache


@dataclass
class FinetuneSettings:
    """The whole settings tree of one run."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    taxonomy: TaxonomySettings = field(default_factory=TaxonomySettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


# Paper defaults per loss: HierarCaps supplementary B.4 (RE, EC) and RCME section 5 (SPEC section 3).
_HIERARCAPS = {"lr": 1e-7, "batch_size": 8, "betas": [0.9, 0.999], "eps": 1e-8, "scheduler": "constant"}
_RCME = {"lr": 1e-5, "batch_size": 32, "betas": [0.9, 0.98], "eps": 1e-6, "scheduler": "one-cycle"}
PAPER_OPTIM = {"re": _HIERARCAPS, "ec": _HIERARCAPS, "rcme": _RCME, "level": _RCME}
PAPER_TOWERS = {"re": "text", "ec": "text", "rcme": "both", "level": "both"}


def resolve(settings: FinetuneSettings) -> FinetuneSettings:
    """Fill the empty settings with the chosen loss's paper defaults and check the tree."""
    validate(settings)
    defaults = PAPER_OPTIM[settings.loss.name]
    optim = dataclasses.replace(
        settings.optim, **{k: v for k, v in defaults.items() if getattr(settings.optim, k) is None}
    )
    loss = settings.loss
    if loss.towers is None:
        loss = dataclasses.replace(loss, towers=PAPER_TOWERS[loss.name])
    return dataclasses.replace(settings, optim=optim, loss=loss)


def _one_of(value: Any, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise SettingsError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def validate(settings: FinetuneSettings) -> None:
    """Checks that the types alone cannot express; errors name the setting."""
    _one_of(settings.model.backend, ("hf-clip", "open-clip", "text"), "model.backend")
    _one_of(settings.loss.name, LOSSES, "loss.name")
    if settings.loss.towers is not None:
        _one_of(settings.loss.towers, ("text", "both"), "loss.towers")
    if settings.optim.scheduler is not None:
        _one_of(settings.optim.scheduler, SCHEDULERS, "optim.scheduler")
    _one_of(settings.run.mixed_precision, MIXED_PRECISION, "run.mixed_precision")
    _one_of(settings.eval.variant, ("released", "paper"), "eval.variant")
    _one_of(settings.data.format, DATA_FORMATS, "data.format")
    _one_of(settings.taxonomy.style, TAXONOMY_STYLES, "taxonomy.style")
    if len(settings.taxonomy.ranks) < 2:
        raise SettingsError(f"taxonomy.ranks must list at least two ranks, general to specific; got {settings.taxonomy.ranks}")
    if "{}" not in settings.taxonomy.template:
        raise SettingsError(f"taxonomy.template must contain {{}} for the rank text; got {settings.taxonomy.template!r}")
    if len(settings.loss.weights) != 3:
        raise SettingsError(f"loss.weights must be three numbers (mean, minimax, reg); got {settings.loss.weights}")
    if settings.optim.betas is not None and len(settings.optim.betas) != 2:
        raise SettingsError(f"optim.betas must be two numbers; got {settings.optim.betas}")
    positive = {
        "optim.epochs": settings.optim.epochs,
        "optim.gradient_accumulation_steps": settings.optim.gradient_accumulation_steps,
        "run.checkpoint_every": settings.run.checkpoint_every,
        "optim.batch_size": settings.optim.batch_size,
        "optim.max_steps": settings.optim.max_steps,
        "data.max_items": settings.data.max_items,
        "eval.batch_size": settings.eval.batch_size,
    }
    for key, value in positive.items():
        if value is not None and value < 1:
            raise SettingsError(f"{key} must be at least 1; got {value}")
    above_zero = {"optim.lr": settings.optim.lr, "optim.eps": settings.optim.eps,
                  "optim.max_grad_norm": settings.optim.max_grad_norm}
    for key, value in above_zero.items():
        if value is not None and not value > 0:
            raise SettingsError(f"{key} must be greater than 0; got {value}")
    if settings.optim.weight_decay < 0:
        raise SettingsError(f"optim.weight_decay must be at least 0; got {settings.optim.weight_decay}")
    if settings.optim.betas is not None and not all(0 <= b < 1 for b in settings.optim.betas):
        raise SettingsError(f"optim.betas must be two numbers in [0, 1); got {settings.optim.betas}")
    if not settings.data.source:
        raise SettingsError("data.source is empty: give a dataset folder, a Hub dataset id or a release CSV")
    if settings.loss.name in IMAGE_LOSSES and settings.model.backend == "text":
        raise SettingsError(
            f"loss.name={settings.loss.name} aligns images too: choose model.backend hf-clip or open-clip"
        )


def load_settings(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneSettings:
    """Defaults, then the settings file (TOML or YAML, same nesting), then ``--set`` overrides.

    Not yet resolved: :func:`resolve` fills loss-specific defaults when the run starts.
    """
    settings = FinetuneSettings()
    if path is not None:
        settings = apply_mapping(settings, read_settings_file(Path(path)), str(path))
    for text in overrides:
        settings = apply_override(settings, text)
    return settings


def from_dict(data: dict[str, Any]) -> FinetuneSettings:
    """Inverse of :func:`to_dict` (checked like a settings file)."""
    return apply_mapping(FinetuneSettings(), data, "settings")
