"""Settings tree: profiles, settings files, ``--set`` overrides, type checks, round trip."""

from __future__ import annotations

import json

import pytest

from hierarcaps.settings import (
    BuildSettings,
    SettingsError,
    apply_override,
    from_dict,
    profile_text,
    resolve_settings,
    to_dict,
)


def test_paper_profile_has_the_papers_models_and_counts():
    s = resolve_settings("paper")
    assert s.profile == "paper" and not s.plumbing_check
    assert s.models.chat_lm.name_or_path == "meta-llama/Llama-2-13b-chat-hf"
    assert s.models.chat_lm.quantization == "4bit"
    assert s.models.base_lm.name_or_path == "meta-llama/Llama-2-13b-hf"
    assert s.models.nli.name_or_path == "facebook/bart-large-mnli"
    assert s.models.completer.name_or_path == "google/flan-t5-base"
    assert (s.seeds.temperature, s.augment.temperature, s.complete.temperature) == (1.2, 1.0, 1.0)
    assert (s.augment.target_count, s.augment.shots) == (10000, 10)
    assert (s.completer.epochs, s.completer.batch_size, s.completer.learning_rate) == (3, 32, 1e-3)
    assert (s.complete.num_candidates, s.negatives.rounds) == (64, 8)
    assert s.captions.seed_captions == 5000 and s.nli.decision == "model"


def test_smoke_profile_is_marked_as_plumbing_check_and_uses_local_models():
    s = resolve_settings("smoke")
    assert s.plumbing_check and s.nli.decision == "length_rule"
    for role in ("chat_lm", "base_lm", "nli", "completer"):
        name = getattr(s.models, role).name_or_path
        assert name.startswith(("tiny:", "tiny-primed:")), name
        assert getattr(s.models, role).quantization is None
    assert s.captions.train.path.startswith("resources:")
    assert "PLUMBING CHECK" in profile_text("smoke")


def test_override_sets_typed_values():
    s = resolve_settings("paper", overrides=[
        "seeds.temperature=0.7", "augment.max_calls=12", "nli.cache=false",
        "models.nli.revision=abc123", "captions.train.column=text", "sharding.concurrency=4",
    ])
    assert s.seeds.temperature == 0.7 and isinstance(s.seeds.temperature, float)
    assert s.augment.max_calls == 12 and s.nli.cache is False
    assert s.models.nli.revision == "abc123" and s.captions.train.column == "text"
    assert s.sharding.concurrency == 4
    # an optional value can be cleared again
    assert apply_override(s, "augment.max_calls=none").augment.max_calls is None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seeds.temprature=1.0", "unknown setting 'seeds.temprature'; allowed here: attempts, batch_size"),
        ("seedz.temperature=1.0", "unknown setting 'seedz'"),
        ("seeds.temperature=hot", "seeds.temperature must be float"),
        ("augment.target_count=1.5", "augment.target_count must be int"),
        ("nli.cache=maybe", "nli.cache must be bool"),
        ("seeds=3", "'seeds' is a group of settings"),
        ("seeds.temperature.x=3", "is a value, not a group"),
        ("seeds.temperature", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        resolve_settings("paper", overrides=[override])


def test_toml_and_yaml_files_apply_over_the_profile(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[seeds]\ntemperature = 1\n[models.chat_lm]\nname_or_path = "/models/chat"\n')
    s = resolve_settings("paper", config=toml)
    assert s.seeds.temperature == 1.0 and isinstance(s.seeds.temperature, float)  # int widened
    assert s.models.chat_lm.name_or_path == "/models/chat"
    assert s.models.chat_lm.quantization == "4bit"  # untouched keys keep the profile's value
    yml = tmp_path / "s.yaml"
    yml.write_text("negatives:\n  rounds: 3\n")
    assert resolve_settings("smoke", config=yml, overrides=["negatives.rounds=4"]).negatives.rounds == 4
    assert resolve_settings("smoke", config=yml).negatives.rounds == 3


def test_settings_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[seeds]\ntemprature = 1.0\n")
    with pytest.raises(SettingsError, match=r"bad\.toml: unknown setting 'seeds\.temprature'"):
        resolve_settings("paper", config=bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("seeds:\n  attempts: many\n")
    with pytest.raises(SettingsError, match=r"wrong\.yaml: seeds\.attempts must be int"):
        resolve_settings("paper", config=wrong)
    broken = tmp_path / "broken.toml"
    broken.write_text("[seeds\n")
    with pytest.raises(SettingsError, match=r"broken\.toml: not valid TOML"):
        resolve_settings("paper", config=broken)
    with pytest.raises(SettingsError, match="unknown profile 'fast'"):
        resolve_settings("fast")


def test_length_rule_needs_plumbing_check():
    with pytest.raises(SettingsError, match="only with plumbing_check=true"):
        resolve_settings("paper", overrides=["nli.decision=length_rule"])
    with pytest.raises(SettingsError, match="nli.decision must be"):
        resolve_settings("smoke", overrides=["nli.decision=vibes"])


def test_resolved_tree_round_trips_through_json():
    s = resolve_settings("smoke", overrides=["complete.num_candidates=5"])
    data = json.loads(json.dumps(to_dict(s)))
    back = from_dict(data)
    assert back == s
    assert isinstance(back, BuildSettings) and back.complete.num_candidates == 5


def test_list_settings_take_json_or_comma_separated_texts():
    from finetune.config import load_settings

    def excluded(text: str) -> list[str]:
        return load_settings(None, [f"data.exclude_images_from={text}"]).data.exclude_images_from

    assert excluded("hierarcaps_test.csv") == ["hierarcaps_test.csv"]
    assert excluded("a.csv, b.csv") == ["a.csv", "b.csv"]
    assert excluded('["a,1.csv"]') == ["a,1.csv"]
    with pytest.raises(SettingsError, match="comma-separated"):
        excluded('["unclosed"')
