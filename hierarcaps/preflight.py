"""Checks of a build's inputs before anything runs: caption files and local model folders.

``build-hierarcaps`` runs them before it starts the flow (and ``--dry-run`` runs them without
loading any model), so that a wrong path, a caption file of the wrong format or one that yields
no usable caption is reported at once, as one line per problem naming the setting and the fix,
instead of minutes later inside a stage. Settings types and value ranges are checked earlier,
when the settings are resolved (:func:`hierarcaps.settings.validate_settings`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

from hierarcaps.stats import StageStats

if TYPE_CHECKING:
    from hierarcaps.settings import BuildSettings

#: Records of each caption file read by the check (a format error shows in the first lines;
#: the captions stage itself reads the whole file).
CAPTION_CHECK_RECORDS = 100_000
MODEL_ROLES = ("chat_lm", "base_lm", "nli", "completer")
_GENERATED_PREFIXES = ("tiny:", "tiny-primed:")


def check_caption_files(settings: "BuildSettings") -> list[str]:
    """The caption file settings are set and name existing files (nothing is read)."""
    from hierarcaps.pipeline import BuildError, check_caption_sources

    try:
        check_caption_sources(settings)
    except BuildError as err:
        return [str(err)]
    return []


def check_caption_content(settings: "BuildSettings", limit: int = CAPTION_CHECK_RECORDS) -> list[str]:
    """Read up to ``limit`` records of each (existing) caption file; one problem per unreadable or unusable file."""
    from hierarcaps.pipeline import no_usable_captions, resolve_path
    from hierarcaps.sources import SourceFormatError, iter_captions

    problems = []
    for split in ("train", "test"):
        source = getattr(settings.captions, split)
        stats = StageStats(stage=f"captions_{split}")
        try:
            rows = iter_captions(resolve_path(source.path), source.format, column=source.column,
                                 min_words=source.min_words, stats=stats)
            usable = sum(1 for _ in itertools.islice(rows, limit))
        except SourceFormatError as err:
            problems.append(f"captions.{split}.format = {source.format!r}: {err}")
            continue
        except ValueError as err:  # an unknown format or a negative min_words
            problems.append(f"captions.{split}: {err}")
            continue
        if usable == 0:
            problems.append(no_usable_captions(split, source, stats))
    return problems


def check_model_paths(settings: "BuildSettings") -> list[str]:
    """One problem per model setting that names a local folder or file that is not there."""
    problems = []
    for role in MODEL_ROLES:
        name = getattr(settings.models, role).name_or_path
        if name.startswith(_GENERATED_PREFIXES):
            continue
        path = Path(name).expanduser()
        local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith(".gguf") or path.exists()
        if not local:
            continue  # a hub id: loaded (or found in the Hugging Face cache) when its stage runs
        key = f"models.{role}.name_or_path = {name!r}"
        if not path.exists():
            problems.append(f"{key}: no such file or folder; give a save_pretrained folder or a hub id (org/name)")
        elif path.is_dir() and not (path / "config.json").is_file():
            problems.append(f"{key}: the folder has no config.json, so it is not a save_pretrained model folder")
    return problems


def check_inputs(settings: "BuildSettings", *, read_captions: bool = True) -> list[str]:
    """Every problem found in the build's inputs (empty when all is well).

    ``read_captions=False`` skips the caption files (their stage is finished and will not read them).
    """
    problems = check_caption_files(settings) if read_captions else []
    if read_captions and not problems:
        problems = check_caption_content(settings)
    return problems + check_model_paths(settings)
