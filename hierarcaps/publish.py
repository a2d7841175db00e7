"""Publishing a finished build to the Hugging Face Hub (or, with a dry run, to a folder).

:func:`publish` refuses a build that is not finished (no ``final/_SUCCESS``), has no manifest,
failed validation, was changed after the build (file hashes differ from the manifest), or is a
smoke-profile plumbing check. Otherwise it pushes the ``DatasetDict`` with
``DatasetDict.push_to_hub`` (private unless ``public``), then uploads the dataset card
(``README.md``, replacing the stub ``push_to_hub`` writes) and ``manifest.json``. The token comes
from the argument, else the usual Hugging Face login (``hf auth login``) or ``HF_TOKEN``.

A dry run writes exactly the files that would be uploaded (``data/<split>-NNNNN-of-NNNNN.parquet``
with the same shard count, ``README.md``, ``manifest.json``) into a folder and contacts nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict, load_from_disk

from hierarcaps.manifest import MANIFEST, verify_manifest
from hierarcaps.stagedir import SUCCESS, atomic_path

FINAL_DIR = "final"
CARD = "README.md"
#: The shard size ``push_to_hub`` uses by default; the dry run shards the same way.
MAX_SHARD_BYTES = 500 * 1024 * 1024


class PublishError(RuntimeError):
    """The build cannot be published (unfinished, failed, changed, or a plumbing check)."""


@dataclass
class PublishResult:
    """What was (or, in a dry run, would have been) uploaded."""

    repo_id: str
    private: bool
    files: list[str]
    dry_run_dir: Path | None = None


def check_publishable(output_dir: Path, allow_plumbing_check: bool = False) -> tuple[Path, dict[str, Any]]:
    """The final folder and manifest of a finished, valid, unchanged build; else :class:`PublishError`."""
    final = Path(output_dir) / FINAL_DIR
    rerun = "run build-hierarcaps with the same --output-dir to finish it"
    if not (final / SUCCESS).is_file():
        raise PublishError(f"{output_dir}: the build is not finished ({final / SUCCESS} is missing); {rerun}")
    if not (final / MANIFEST).is_file():
        raise PublishError(f"{final / MANIFEST} is missing; delete {final} and {rerun}")
    manifest = json.loads((final / MANIFEST).read_text(encoding="utf-8"))
    validation = manifest.get("validation", {})
    if not validation.get("ok", False):
        problems = "; ".join(validation.get("problems", [])[:5]) or "no validation record"
        raise PublishError(f"{final}: validation failed, refusing to publish ({problems})")
    if manifest.get("plumbing_check") and not allow_plumbing_check:
        raise PublishError(
            f"{final} was built with the smoke profile: a plumbing check, not usable data; refusing to publish it"
        )
    changed = verify_manifest(final, manifest)
    if changed:
        raise PublishError(f"{final} differs from its manifest: {'; '.join(changed[:5])}; rebuild it")
    return final, manifest


def num_shards(dataset: DatasetDict) -> dict[str, int]:
    """Parquet shards per split, as ``push_to_hub`` computes them for ``MAX_SHARD_BYTES``."""
    return {name: max(1, math.ceil((split.data.nbytes or 0) / MAX_SHARD_BYTES)) for name, split in dataset.items()}


def planned_files(dataset: DatasetDict) -> list[str]:
    """Repository paths of every file the upload creates."""
    files = [
        f"data/{name}-{i:05d}-of-{n:05d}.parquet" for name, n in num_shards(dataset).items() for i in range(n)
    ]
    return files + [CARD, MANIFEST]


def write_dry_run(final: Path, dataset: DatasetDict, out_dir: Path) -> list[str]:
    """Write the files an upload would create into ``out_dir`` (replaced atomically)."""
    files = planned_files(dataset)
    with atomic_path(Path(out_dir)) as tmp:
        for name, n in num_shards(dataset).items():
            for i in range(n):
                path = tmp / f"data/{name}-{i:05d}-of-{n:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                dataset[name].shard(num_shards=n, index=i, contiguous=True).to_parquet(str(path))
        tmp.mkdir(exist_ok=True)
        shutil.copyfile(final / CARD, tmp / CARD)
        shutil.copyfile(final / MANIFEST, tmp / MANIFEST)
    return files


def publish(
    output_dir: Path,
    repo_id: str,
    *,
    public: bool = False,
    token: str | None = None,
    dry_run_dir: Path | None = None,
    allow_plumbing_check: bool = False,
) -> PublishResult:
    """Push a finished build's ``DatasetDict``, card and manifest to ``repo_id`` (a dataset repo)."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PublishError(f"--repo-id {repo_id!r}: expected ORG/NAME, e.g. my-lab/hierarcaps-rebuilt")
    final, _ = check_publishable(output_dir, allow_plumbing_check=allow_plumbing_check)
    dataset = load_from_disk(str(final / "dataset"))
    if dry_run_dir is not None:
        files = write_dry_run(final, dataset, dry_run_dir)
        return PublishResult(repo_id, not public, files, Path(dry_run_dir))
    from huggingface_hub import HfApi

    dataset.push_to_hub(repo_id, private=not public, token=token, num_shards=num_shards(dataset))
    api = HfApi(token=token)
    for name in (CARD, MANIFEST):
        api.upload_file(
            path_or_fileobj=str(final / name),
            path_in_repo=name,
            repo_id=repo_id,
            repo_type="dataset",
            commit_message=f"Add {name} (hierarcaps build)",
        )
    return PublishResult(repo_id, not public, planned_files(dataset))
