"""The build manifest: what was built, from what, with what, and the hash of every file.

``manifest.json`` sits beside the final dataset. It records the resolved settings, the
installed package versions, the Python and platform, the models (with revisions) each stage
used, how each generating stage sampled (library, temperature, top-k, top-p), the counts of every stage and split, the stage directories of the lineage, and the
sha256 of every file of the output, so a reader can check that a dataset on disk (or on the
Hub) is the one the manifest describes (:func:`verify_manifest`).
"""

from __future__ import annotations

import hashlib
import platform
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from hierarcaps.stagedir import SUCCESS, package_versions, to_jsonable, write_json_atomic

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(root: Path, exclude: tuple[str, ...] = (MANIFEST, SUCCESS)) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every file under ``root``, sorted by path.

    Top-level files named in ``exclude`` (the manifest itself, the ``_SUCCESS`` marker) are left out.
    """
    root = Path(root)
    hashes = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        hashes[rel] = sha256_file(path)
    return hashes


def build_manifest(
    root: Path,
    *,
    settings: Mapping[str, Any],
    counts: Mapping[str, Any],
    models: Mapping[str, Any],
    stages: list[Mapping[str, Any]],
    validation: Mapping[str, Any],
    sampling: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of the output folder ``root`` (hashes are taken now, of the files present).

    ``sampling``: per generating stage the library, temperature, top_k and top_p it sampled with.
    """
    return {
        "manifest_version": MANIFEST_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": to_jsonable(settings),
        "plumbing_check": bool(settings.get("plumbing_check", False)),
        "counts": to_jsonable(counts),
        "models": to_jsonable(models),
        "stages": to_jsonable(stages),
        "sampling": to_jsonable(sampling or {}),
        "validation": to_jsonable(validation),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "files": file_hashes(root),
    }


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``root/manifest.json`` atomically and return its path."""
    path = Path(root) / MANIFEST
    write_json_atomic(path, manifest)
    return path


def verify_manifest(root: Path, manifest: Mapping[str, Any]) -> list[str]:
    """Differences between the files under ``root`` and the manifest's hashes (empty: all match)."""
    expected: Mapping[str, str] = manifest.get("files", {})
    actual = file_hashes(root)
    problems = [f"missing file {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"file not in the manifest: {name}" for name in sorted(set(actual) - set(expected))]
    problems += [
        f"file changed since the build: {name}"
        for name in sorted(set(expected) & set(actual))
        if expected[name] != actual[name]
    ]
    return problems
