"""The typed settings tree of a HierarCaps build.

One tree of dataclasses holds every setting of a build: caption sources and counts, the four
models (chat LLM, base LLM, NLI, completer), the NLI scorer, each stage's settings (the stage
modules' own dataclasses), sharding and output. It is resolved in layers:

1. the dataclass defaults,
2. a built-in profile (``paper``, the default, or ``smoke``; TOML files shipped as
   ``hierarcaps.resources/profiles/<name>.toml``),
3. an optional user settings file (TOML or YAML, same nesting),
4. ``--set a.b=c`` overrides from the command line.

Every layer is checked: an unknown key is an error that names it, where it came from and the
keys allowed there; a value of the wrong type is an error that names the key and the type
expected. The resolved tree is written beside every output (:func:`to_dict`) and can be read
back (:func:`from_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from hierarcaps.models import ModelSpec
from hierarcaps.stages.augment import AugmentSettings
from hierarcaps.stages.complete import CompleteSettings
from hierarcaps.stages.completer import CompleterSettings
from hierarcaps.stages.negatives import NegativeSettings
from hierarcaps.stages.seeds import SeedSettings
from hierarcaps.stagedir import to_jsonable

PROFILES = ("paper", "smoke")
BACKENDS = ("hf", "vllm")
#: Stages that sample text (each has ``temperature``, ``top_k``, ``top_p``), and the model role
#: each samples from.
GENERATING_STAGES = {"seeds": "chat_lm", "augment": "base_lm", "complete": "completer", "negatives": "completer"}
TINY_PREFIX = "tiny:"

T = TypeVar("T")


class SettingsError(ValueError):
    """A settings file, profile or ``--set`` override is not valid."""


@dataclass
class SourceSettings:
    """One caption source file (see :func:`hierarcaps.sources.iter_captions`)."""

    path: str = ""
    format: str = "cc_tsv"  # cc_tsv | coco_json | text | csv
    column: str | None = None
    min_words: int = 10


@dataclass
class CaptionSettings:
    """Where captions come from and how many are sampled (SPEC section 2, step 1)."""

    train: SourceSettings = field(default_factory=lambda: SourceSettings(format="cc_tsv"))
    test: SourceSettings = field(default_factory=lambda: SourceSettings(format="coco_json"))
    seed_captions: int = 5000
    train_captions: int = 150000
    test_captions: int = 5000
    seed: int = 0


@dataclass
class ModelSettings:
    """The models of the build; each takes a hub id, a local folder, or ``tiny:<kind>``.

    ``tiny:<kind>`` (smoke profile) names a tiny random model built locally by
    :func:`hierarcaps.tiny_models.build_tiny_model` into ``<output-dir>/tiny-models/<kind>``.
    """

    chat_lm: ModelSpec = field(
        default_factory=lambda: ModelSpec("meta-llama/Llama-2-13b-chat-hf", quantization="4bit")
    )
    base_lm: ModelSpec = field(default_factory=lambda: ModelSpec("meta-llama/Llama-2-13b-hf", quantization="4bit"))
    nli: ModelSpec = field(default_factory=lambda: ModelSpec("facebook/bart-large-mnli", batch_size=64))
    completer: ModelSpec = field(default_factory=lambda: ModelSpec("google/flan-t5-base"))


@dataclass
class GenerationSettings:
    """Which library samples text for the generating roles (see ``docs/models.md``).

    ``backend``: ``hf`` (transformers ``generate``) or ``vllm`` (vLLM's offline engine with prefix
    caching; ``pip install "hierarcaps[vllm]"``, CUDA GPU) for the chat LM, the base LM and the
    completer. vLLM has no encoder-decoder (T5) support, so ``completer_backend`` (``None``: as
    ``backend`` for a decoder-only completer, ``hf`` for a T5 one) set to ``vllm`` with a T5
    completer is an error.
    """

    backend: str = "hf"  # hf | vllm
    completer_backend: str | None = None  # hf | vllm | none (as backend; hf for a T5 completer)


@dataclass
class NLISettings:
    """The NLI scorer: input template, on-disk cache, and how decisions are taken.

    ``decision = "model"`` is the paper's rule (probabilities against 0.5). ``"length_rule"``
    exists ONLY for the smoke profile, whose random tiny NLI model decides nothing meaningful:
    the model still scores every pair (plumbing), but "a entails b" is replaced by "a is longer
    than b" and every pair counts as contradicting, so data flows. Output built so is marked
    as a plumbing check, not usable data.

    ``max_batch_tokens`` bounds each NLI forward pass by padded tokens (pairs x longest pair);
    ``models.nli.batch_size`` bounds its pairs. 0 turns the token budget off.
    """

    template: str = 'a picture of: "{}"'
    cache: bool = True
    decision: str = "model"  # model | length_rule
    max_batch_tokens: int = 16384


@dataclass
class ShardingSettings:
    """How long stages are split and run: ``shard_size`` items per shard, ``concurrency`` shards at once."""

    shard_size: int = 1000
    concurrency: int = 1


@dataclass
class OutputSettings:
    """What the build writes besides the ``DatasetDict``, and the card's metadata."""

    parquet: bool = True
    release_csv: bool = True
    pretty_name: str = "HierarCaps (rebuilt with hierarcaps)"
    license: str = "other"


@dataclass
class BuildSettings:
    """The whole build."""

    profile: str = "paper"
    seed: int = 0
    plumbing_check: bool = False
    captions: CaptionSettings = field(default_factory=CaptionSettings)
    models: ModelSettings = field(default_factory=ModelSettings)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    nli: NLISettings = field(default_factory=NLISettings)
    seeds: SeedSettings = field(default_factory=SeedSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    completer: CompleterSettings = field(default_factory=CompleterSettings)
    complete: CompleteSettings = field(default_factory=CompleteSettings)
    negatives: NegativeSettings = field(default_factory=NegativeSettings)
    sharding: ShardingSettings = field(default_factory=ShardingSettings)
    output: OutputSettings = field(default_factory=OutputSettings)


# ----------------------------------------------------------------------------- generic machinery


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_optional(tp: Any) -> tuple[bool, Any]:
    """``(True, X)`` for ``X | None``, else ``(False, tp)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str, origin: str) -> Any:
    """Check ``value`` (from a file: already typed) against ``tp``; ints widen to floats."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise SettingsError(f"{origin}: {key} cannot be empty (expected {_type_name(inner)})")
    if inner is bool:
        if isinstance(value, bool):
            return value
    elif inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif inner is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(inner) in (list, tuple):
        if isinstance(value, (list, tuple)):
            return type(value)(value) if typing.get_origin(inner) is list else tuple(value)
    else:
        return value
    raise SettingsError(f"{origin}: {key} must be {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    name = getattr(inner, "__name__", str(inner))
    return f"{name} or none" if optional else name


def apply_mapping(obj: T, data: Mapping[str, Any], origin: str, prefix: str = "") -> T:
    """A copy of the dataclass ``obj`` with the values of the nested mapping ``data`` set.

    ``origin`` (a file name, "profile smoke", ...) appears in every error message.
    """
    if not isinstance(data, Mapping):
        raise SettingsError(f"{origin}: {prefix.rstrip('.') or 'settings'} must be a table of keys, got {data!r}")
    types_ = _field_types(type(obj))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in types_:
            raise SettingsError(
                f"{origin}: unknown setting {dotted!r}; allowed here: {', '.join(sorted(types_))}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = apply_mapping(current, value, origin, dotted + ".")
        else:
            changes[key] = _coerce(value, types_[key], dotted, origin)
    return _replace(obj, changes, f"{origin}: {prefix.rstrip('.') or 'settings'}")


def _replace(obj: T, changes: Mapping[str, Any], where: str) -> T:
    """``dataclasses.replace``; a value its class refuses (e.g. a model's dtype) is a :class:`SettingsError`."""
    try:
        return dataclasses.replace(obj, **changes)
    except SettingsError:
        raise
    except ValueError as err:
        raise SettingsError(f"{where}: {err}") from None


def parse_override(text: str) -> tuple[list[str], str]:
    """Split ``a.b.c=value`` into (``["a", "b", "c"]``, ``"value"``)."""
    if "=" not in text:
        raise SettingsError(f"--set {text!r}: expected KEY=VALUE, e.g. --set seeds.temperature=1.2")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise SettingsError(f"--set {text!r}: malformed key {key!r}")
    return parts, value.strip()


def _parse_text(value: str, tp: Any, key: str) -> Any:
    """Read a command-line text as a value of type ``tp``."""
    optional, inner = _is_optional(tp)
    origin = f"--set {key}={value}"
    if optional and value.lower() in ("none", "null", ""):
        return None
    try:
        if inner is bool:
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int:
            return int(value)
        if inner is float:
            return float(value)
        if inner is str:
            return value
        if typing.get_origin(inner) is list and not value.lstrip().startswith("["):
            # A list of plain texts may be written without JSON: a,b,c
            return _coerce([item.strip() for item in value.split(",") if item.strip()], tp, key, origin)
        return _coerce(json.loads(value), tp, key, origin)
    except (ValueError, json.JSONDecodeError) as err:
        hint = ' (a JSON value, e.g. ["a", "b"], or comma-separated texts)' if typing.get_origin(inner) is list else ""
        raise SettingsError(f"{origin}: {key} must be {_type_name(tp)}{hint}") from err


def apply_override(obj: T, text: str) -> T:
    """Apply one ``--set a.b=c``; the error for an unknown key lists the keys allowed there."""
    parts, raw = parse_override(text)
    return _set_path(obj, parts, raw, "")


def _set_path(obj: Any, parts: list[str], raw: str, prefix: str) -> Any:
    types_ = _field_types(type(obj))
    key, rest = parts[0], parts[1:]
    dotted = f"{prefix}{key}"
    if key not in types_:
        raise SettingsError(f"--set: unknown setting {dotted!r}; allowed here: {', '.join(sorted(types_))}")
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current):
        if not rest:
            raise SettingsError(f"--set: {dotted!r} is a group of settings; set one of its keys, e.g. {dotted}.…")
        return dataclasses.replace(obj, **{key: _set_path(current, rest, raw, dotted + ".")})
    if rest:
        raise SettingsError(f"--set: {dotted!r} is a value, not a group; cannot set {dotted}.{'.'.join(rest)}")
    return _replace(obj, {key: _parse_text(raw, types_[key], dotted)}, f"--set {prefix.rstrip('.') or key}")


def read_settings_file(path: Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) settings file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: settings file not found")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise SettingsError(f"{path}: settings files must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise SettingsError(f"{path}: not valid {suffix[1:].upper()}: {err}") from err
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: the top level must be a table of settings")
    return data


def profile_text(name: str) -> str:
    """The text of a built-in profile file."""
    if name not in PROFILES:
        raise SettingsError(f"unknown profile {name!r}; built-in profiles: {', '.join(PROFILES)}")
    return (resources.files("hierarcaps.resources") / "profiles" / f"{name}.toml").read_text(encoding="utf-8")


def resolve_settings(
    profile: str = "paper",
    config: Path | None = None,
    overrides: typing.Sequence[str] = (),
) -> BuildSettings:
    """Defaults, then the profile, then the settings file, then ``--set`` overrides."""
    settings = apply_mapping(BuildSettings(), tomllib.loads(profile_text(profile)), f"profile {profile!r}")
    settings = dataclasses.replace(settings, profile=profile)
    if config is not None:
        settings = apply_mapping(settings, read_settings_file(config), str(config))
    for text in overrides:
        settings = apply_override(settings, text)
    validate_settings(settings)
    return settings


def validate_settings(settings: BuildSettings) -> None:
    """Checks across settings that types alone cannot express."""
    if settings.nli.decision not in ("model", "length_rule"):
        raise SettingsError(f"nli.decision must be 'model' or 'length_rule', got {settings.nli.decision!r}")
    if settings.nli.decision != "model" and not settings.plumbing_check:
        raise SettingsError(
            "nli.decision='length_rule' replaces the NLI model's decisions and makes unusable data; "
            "it is allowed only with plumbing_check=true (the smoke profile)"
        )
    for key, value in (("generation.backend", settings.generation.backend),
                       ("generation.completer_backend", settings.generation.completer_backend or "hf")):
        if value not in BACKENDS:
            raise SettingsError(f"{key} must be one of {', '.join(BACKENDS)}, got {value!r}")
    if settings.models.nli.batch_size is None:
        raise SettingsError("models.nli.batch_size cannot be none: it is the number of pairs per NLI forward pass")
    for stage in GENERATING_STAGES:
        top_p = getattr(settings, stage).top_p
        if top_p is not None and not 0 < top_p <= 1:
            raise SettingsError(f"{stage}.top_p must be in (0, 1], or none for no nucleus filter; got {top_p}")
    for key, value, low, strict in _ranged_values(settings):
        if value is not None and not (value > low if strict else value >= low):
            bound = f"greater than {low}" if strict else f"at least {low}"
            raise SettingsError(f"{key} must be {bound}; got {value}")


#: Lower bounds of numeric settings, by the setting's name anywhere in the tree: (bound, strict).
RANGES: dict[str, tuple[float, bool]] = {
    **{name: (1, False) for name in (
        "seed_captions", "train_captions", "test_captions", "shard_size", "concurrency", "batch_size",
        "max_new_tokens", "attempts", "target_count", "shots", "max_calls", "epochs", "max_source_length",
        "max_target_length", "num_candidates", "nli_wave", "rounds",
    )},
    "min_words": (0, False),
    "max_batch_tokens": (0, False),  # 0: no token budget
    "top_k": (1, False),  # none: no top-k filter
    "temperature": (0.0, True),
    "learning_rate": (0.0, True),
}


def _ranged_values(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, float, bool]]:
    """``(dotted key, value, bound, strict)`` for every setting named in :data:`RANGES`."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _ranged_values(value, f"{prefix}{f.name}.")
        elif f.name in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            yield (f"{prefix}{f.name}", value, *RANGES[f.name])


def to_dict(settings: Any) -> dict[str, Any]:
    """The resolved tree as plain JSON-ready data."""
    return to_jsonable(settings)


def from_dict(data: Mapping[str, Any]) -> BuildSettings:
    """Inverse of :func:`to_dict` (checked like a settings file)."""
    return apply_mapping(BuildSettings(), data, "resolved settings")
