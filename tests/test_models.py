"""Model loading: every tiny model loads through ModelSpec; failures name the model and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hierarcaps.models import (
    ModelLoadError,
    ModelSpec,
    content_hash,
    describe_model,
    load_causal_lm,
    load_nli,
    load_seq2seq_lm,
    nli_label_indices,
    provenance_id,
    resolve_dtype,
)


def test_causal_lm_pads_left_with_eos(tiny_causal_lm_dir: Path) -> None:
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), device="cpu"))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert not model.training


def test_left_padded_batch_generates_like_single_prompts(tiny_chat_lm_dir: Path) -> None:
    """With left padding a short prompt in a batch continues exactly as it does alone."""
    model, tokenizer = load_causal_lm(ModelSpec(str(tiny_chat_lm_dir)))
    prompts = ["a goat", "a goat eating leaves of a lemon tree on the island"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch.input_ids.shape[0] == 2 and batch.attention_mask[0, 0] == 0
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch.input_ids.shape[1]:]
    for row, prompt in zip(together, prompts):
        alone = tokenizer([prompt], return_tensors="pt")
        single = model.generate(**alone, max_new_tokens=6, do_sample=False)[0, alone.input_ids.shape[1]:]
        assert row.tolist() == single.tolist()


def test_seq2seq_and_nli_load(tiny_seq2seq_dir: Path, tiny_nli_dir: Path) -> None:
    t5, t5_tok = load_seq2seq_lm(ModelSpec(str(tiny_seq2seq_dir)))
    assert type(t5).__name__ == "T5ForConditionalGeneration" and t5_tok.pad_token_id == 0
    nli, _ = load_nli(ModelSpec(str(tiny_nli_dir)))
    assert nli.config.num_labels == 3


def test_describe_model_records_what_was_loaded(tiny_nli_dir: Path) -> None:
    spec = ModelSpec(str(tiny_nli_dir), dtype="bfloat16")
    model, _ = load_nli(spec)
    info = describe_model(model)
    assert info["id"] == provenance_id(spec) and str(tiny_nli_dir) not in info["id"]
    assert info["class"] == "BartForSequenceClassification"
    assert info["dtype"] == "bfloat16" and info["device"] == "cpu"
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["quantization"] is None


def test_auto_dtype_is_float32_on_cpu() -> None:
    assert resolve_dtype(ModelSpec("x/y"), torch.device("cpu")) == torch.float32
    assert resolve_dtype(ModelSpec("x/y", dtype="float16"), torch.device("cpu")) == torch.float16


def test_missing_folder_names_the_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"NLI model '{missing}'.*no such file or folder"):
        load_nli(ModelSpec(str(missing)))


def test_offline_hub_id_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as error:
        load_seq2seq_lm(ModelSpec("hierarcaps-test/not-a-real-model", revision="v1"))
    message = str(error.value)
    assert "'hierarcaps-test/not-a-real-model@v1'" in message
    assert "huggingface-cli download hierarcaps-test/not-a-real-model" in message


def test_folder_without_tokenizer_is_a_load_error(tiny_open_clip_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="save_pretrained model and tokenizer"):
        load_causal_lm(ModelSpec(str(tiny_open_clip_dir)))


def test_4bit_on_cpu_is_a_clear_error(tiny_causal_lm_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="4-bit quantization needs a CUDA GPU.*set quantization to none"):
        load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), device="cpu", quantization="4bit"))


def test_cuda_device_without_cuda_is_a_clear_error(tiny_nli_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelLoadError, match="CUDA is not available here"):
        load_nli(ModelSpec(str(tiny_nli_dir), device="cuda"))


def test_spec_validation() -> None:
    assert ModelSpec("a/b", quantization="none").quantization is None
    assert ModelSpec("a/b").trust_remote_code is False
    with pytest.raises(ValueError, match="quantization '8bit'"):
        ModelSpec("a/b", quantization="8bit")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        ModelSpec("a/b", dtype="fp8")
    with pytest.raises(ValueError, match="name_or_path is empty"):
        ModelSpec("")


def test_label_indices_from_id2label_any_case() -> None:
    class Config:
        id2label = {0: "ENTAILMENT", 1: "Contradiction", 2: "neutral"}

    assert nli_label_indices(Config()) == {"entailment": 0, "neutral": 2, "contradiction": 1}
    Config.id2label = {0: "LABEL_0", 1: "LABEL_1", 2: "entailment"}
    with pytest.raises(ModelLoadError, match="lacks neutral, contradiction"):
        nli_label_indices(Config())


def test_non_nli_classifier_is_rejected(tiny_text_encoder_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="id2label"):
        load_nli(ModelSpec(str(tiny_text_encoder_dir)))


@pytest.mark.parametrize(
    ("error", "advice"),
    [
        (OSError("Cannot access gated repo for url https://huggingface.co/meta-llama/x. 401 Client Error"),
         "huggingface-cli login"),
        (ImportError("T5Tokenizer requires the SentencePiece library: pip install sentencepiece"),
         "install the missing package"),
        (ValueError("The repository requires you to execute code; pass trust_remote_code=True"),
         "set trust_remote_code to true"),
        (OSError("invalid-rev is not a valid git identifier (branch name, tag name or commit id)"),
         "check the revision"),
    ],
)
def test_hub_failures_get_specific_advice(monkeypatch: pytest.MonkeyPatch, error: Exception, advice: str) -> None:
    """The hub cannot be reached here, so its failures are raised by a stand-in for from_pretrained."""
    seen: dict = {}

    def fail(name: str, **kwargs: object) -> None:
        seen.update(kwargs)
        raise error

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", fail)
    with pytest.raises(ModelLoadError, match=f"(?s)'meta-llama/Llama-2-13b-chat-hf@abc'.*{advice}") as caught:
        load_causal_lm(ModelSpec("meta-llama/Llama-2-13b-chat-hf", revision="abc", device="cpu"))
    assert caught.value.__cause__ is error
    assert seen == {"trust_remote_code": False, "revision": "abc"}


def test_content_hash_depends_on_bytes_not_on_place_or_time(tiny_nli_dir: Path, tmp_path: Path) -> None:
    import os
    import shutil

    copy = tmp_path / "elsewhere" / tiny_nli_dir.name
    shutil.copytree(tiny_nli_dir, copy)  # new mtimes, other absolute path
    os.utime(copy / "config.json", (1, 1))
    (copy / "training_log.json").write_text('{"seconds": 12.3}')  # a run record, not the model
    assert content_hash(copy) == content_hash(tiny_nli_dir)
    assert provenance_id(ModelSpec(str(copy))) == provenance_id(ModelSpec(str(tiny_nli_dir)))
    assert provenance_id(ModelSpec(str(copy)), name="completer").startswith("completer#sha256:")
    config = copy / "config.json"
    config.write_text(config.read_text().replace("{", '{"edited": true,', 1))
    assert content_hash(copy) != content_hash(tiny_nli_dir)  # changed bytes, another id


def test_provenance_id_of_hub_models_is_id_at_revision() -> None:
    assert provenance_id(ModelSpec("org/model", revision="v1")) == "org/model@v1"
    assert provenance_id(ModelSpec("org/model"), commit="abc123") == "org/model@abc123"
    assert provenance_id(ModelSpec("org/model")) == "org/model"


def test_a_generator_over_a_local_model_names_it_without_its_path(tiny_causal_lm_dir: Path) -> None:
    from hierarcaps.generation import TextGenerator

    generator = TextGenerator(*load_causal_lm(ModelSpec(str(tiny_causal_lm_dir), device="cpu")))
    assert generator.model_id == f"{tiny_causal_lm_dir.name}#sha256:{content_hash(tiny_causal_lm_dir)}"
