"""``generation.backend``, per-stage top_k/top_p and ``models.<role>.batch_size`` in the build.

Which library samples each role, which stage directories a setting reruns, the settings
checks, and what the card and manifest record. No vLLM here: a missing ``vllm`` is simulated
through ``sys.modules`` (the adapter itself is tested in ``test_vllm_backend.py``).
"""

from __future__ import annotations

import sys

import pytest

from hierarcaps.card import render_card
from hierarcaps.manifest import build_manifest
from hierarcaps.models import ModelLoadError, ModelSpec
from hierarcaps.pipeline import Pipeline, sampling_used
from hierarcaps.settings import SettingsError, resolve_settings, to_dict


def _pipe(tmp_path, *overrides: str) -> Pipeline:
    return Pipeline(resolve_settings("smoke", overrides=list(overrides)), tmp_path)


def test_hf_is_the_default_backend_and_a_t5_completer_stays_on_hf_under_vllm(tmp_path, tiny_seq2seq_dir,
                                                                                tiny_causal_lm_dir) -> None:
    t5, llama = ModelSpec(str(tiny_seq2seq_dir)), ModelSpec(str(tiny_causal_lm_dir))
    assert {_pipe(tmp_path).backend(role, llama) for role in ("chat_lm", "base_lm", "completer")} == {"hf"}
    pipe = _pipe(tmp_path, "generation.backend=vllm")
    assert pipe.backend("chat_lm", t5) == "vllm" and pipe.backend("base_lm", llama) == "vllm"
    assert pipe.backend("completer", t5) == "hf"  # vLLM cannot run T5: the default keeps it on transformers
    assert pipe.backend("trained_completer", llama) == "vllm"  # a decoder-only completer follows the backend
    assert _pipe(tmp_path, "generation.backend=vllm", "generation.completer_backend=hf").backend(
        "completer", llama) == "hf"


def test_asking_vllm_for_a_t5_completer_is_a_clear_error(tmp_path, tiny_seq2seq_dir) -> None:
    pipe = _pipe(tmp_path, "generation.completer_backend=vllm")
    with pytest.raises(ModelLoadError, match="models.completer .*vLLM has no T5 / encoder-decoder support"):
        pipe.backend("completer", ModelSpec(str(tiny_seq2seq_dir)))


def test_vllm_backend_without_vllm_names_the_extra(tmp_path, monkeypatch, tiny_chat_lm_dir) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # as when vLLM is not installed
    pipe = _pipe(tmp_path, "generation.backend=vllm", f"models.chat_lm.name_or_path={tiny_chat_lm_dir}")
    with pytest.raises(ModelLoadError, match=r'models.chat_lm.*pip install "hierarcaps\[vllm\]"'):
        pipe.generator("chat_lm")


def test_hf_generator_gets_the_role_batch_size(tmp_path, tiny_chat_lm_dir) -> None:
    pipe = _pipe(tmp_path, f"models.chat_lm.name_or_path={tiny_chat_lm_dir}", "models.chat_lm.batch_size=3")
    generator = pipe.generator("chat_lm")
    assert generator.backend == "hf" and generator.batch_size == 3


def _dirs(tmp_path, *overrides: str) -> dict[str, str]:
    return {name: d.name for name, d in _pipe(tmp_path, *overrides).dirs.items()}


def test_settings_rerun_the_stages_they_change_and_no_others(tmp_path) -> None:
    base = _dirs(tmp_path)
    # the completer's batch size batches its sampling (completion, negatives), not its training
    changed = _dirs(tmp_path, "models.completer.batch_size=4")
    assert changed["completer"] == base["completer"] and changed["augment"] == base["augment"]
    assert changed["complete_train"] != base["complete_train"] and changed["negatives"] != base["negatives"]
    # the chat LM's batch size reruns the seeds stage (and what follows)
    assert _dirs(tmp_path, "models.chat_lm.batch_size=4")["seeds"] != base["seeds"]
    top_k = _dirs(tmp_path, "negatives.top_k=50")
    assert top_k["negatives"] != base["negatives"] and top_k["complete_train"] == base["complete_train"]
    vllm = _dirs(tmp_path, "generation.backend=vllm")
    assert vllm["seeds"] != base["seeds"] and vllm["captions"] == base["captions"]


@pytest.mark.parametrize("override, message", [
    ("seeds.top_k=0", "seeds.top_k must be at least 1"),
    ("complete.top_p=1.5", r"complete.top_p must be in \(0, 1\]"),
    ("augment.temperature=0", "augment.temperature must be greater than 0"),
    ("generation.backend=tgi", "generation.backend must be one of hf, vllm"),
    ("generation.completer_backend=x", "generation.completer_backend must be one of hf, vllm"),
    ("models.nli.batch_size=none", "models.nli.batch_size cannot be none"),
])
def test_bad_sampling_and_backend_settings_are_named(override, message) -> None:
    with pytest.raises(SettingsError, match=message):
        resolve_settings("smoke", overrides=[override])


def test_card_and_manifest_record_how_each_stage_sampled(tmp_path, tiny_chat_lm_dir, tiny_causal_lm_dir,
                                                        tiny_seq2seq_dir) -> None:
    models = [f"models.chat_lm.name_or_path={tiny_chat_lm_dir}", f"models.base_lm.name_or_path={tiny_causal_lm_dir}",
              f"models.completer.name_or_path={tiny_seq2seq_dir}"]
    pipe = _pipe(tmp_path, *models, "seeds.top_k=50", "seeds.top_p=0.9", "generation.backend=vllm")
    sampling = sampling_used(pipe)
    assert sampling["seeds"] == {"role": "chat_lm", "backend": "vllm", "temperature": pipe.settings.seeds.temperature,
                                 "top_k": 50, "top_p": 0.9}
    assert sampling["complete"]["top_k"] is None and sampling["negatives"]["role"] == "completer"
    assert sampling["negatives"]["backend"] == "hf"  # the T5 completer
    settings = to_dict(pipe.settings)
    card = render_card(settings=settings, counts={"train": 1}, models={}, stages=[], sampling=sampling)
    assert "## Sampling" in card
    assert "| seeds | chat_lm | vllm | 1.2 | 50 | 0.9 |" in card
    assert "| augment | base_lm | vllm | 1.0 | none | none |" in card
    assert "| complete | completer | hf | 1.0 | none | none |" in card
    assert "differ from the paper's plain temperature sampling" in card
    plain = render_card(settings=settings, counts={"train": 1}, models={}, stages=[],
                        sampling=sampling_used(_pipe(tmp_path, *models)))
    assert "Every stage used plain temperature sampling" in plain
    manifest = build_manifest(tmp_path, settings=settings, counts={}, models={}, stages=[],
                              validation={}, sampling=sampling)
    assert manifest["sampling"]["seeds"]["top_k"] == 50
