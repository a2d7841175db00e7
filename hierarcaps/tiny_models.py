"""Tiny, randomly initialised models with real architectures, built locally in seconds.

No model weights can be downloaded on the machines that build and test hierarcaps (see
``MODELS.md``). The product still has to prove every model code path: loading from a folder,
tokenisation, padding, batching, label order, generation, encoding. This module builds small
instances of each architecture the product uses and ``save_pretrained``s them to a folder,
which the product then loads through its normal loading code (:mod:`hierarcaps.models`,
``finetune.backends``). The test fixtures, the ``smoke`` profile and the benchmarks all use it.

Kinds (``build_tiny_model(kind, out_dir)``):

* ``causal_lm``    Llama, no chat template, no pad token (like ``Llama-2-13b-hf``).
* ``chat_lm``      Llama with a Llama-2-style ``[INST] ... [/INST]`` chat template.
* ``seq2seq``      T5 (like ``flan-t5-base``); its tokenizer lacks ``→`` and ``←`` (they map to
  ``<unk>``), so the completer must add them as special tokens, as with the real model.
* ``nli``          BART sequence classifier, ``id2label`` = {0: contradiction, 1: neutral,
  2: entailment} (the order of ``facebook/bart-large-mnli``).
* ``nli_shuffled`` the same network with its classification-head rows permuted and
  ``id2label`` = {0: ENTAILMENT, 1: Contradiction, 2: neutral}: it gives exactly the same
  probability per *label* as ``nli``, so a scorer that reads ``id2label`` gives identical
  results on both, and one that assumes an order does not.
* ``hf_clip``      transformers ``CLIPModel`` with ``CLIPProcessor`` (32x32 images, 77 tokens).
* ``open_clip``    an open_clip CLIP (open_clip's own BPE tokenizer) in a folder loadable with
  ``open_clip.create_model_and_transforms("local-dir:" + path)``.
* ``text_encoder`` a small BERT with a WordPiece tokenizer.

Tokenizers are trained with the ``tokenizers`` library on a few hundred caption-like English
sentences generated from a fixed grammar (:func:`tiny_corpus`). Everything is seeded; building
the same kind twice gives identical files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import torch

__all__ = ["KINDS", "NLI_LABELS", "NLI_SHUFFLED_LABELS", "build_tiny_model", "tiny_corpus"]

SEED = 0
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}
# Row i of the shuffled head is row NLI_SHUFFLE[i] of the standard head.
NLI_SHUFFLE = [2, 0, 1]
NLI_SHUFFLED_LABELS = {0: "ENTAILMENT", 1: "Contradiction", 2: "neutral"}

# Words of the HierarCaps paper's examples plus a small caption vocabulary.
_ANIMALS = ["goat", "frog", "dog", "cat", "horse", "bird", "cow", "sheep", "fish", "lion", "elephant"]
_PEOPLE = ["man", "woman", "child", "boy", "girl", "person", "people", "player", "chef", "family"]
_PLACES = ["island", "beach", "street", "park", "kitchen", "field", "forest", "city", "river",
           "mountain", "garden", "room"]
_ACTIONS = ["eating leaves of", "standing near", "walking on", "sitting under", "looking at",
            "running through", "playing in", "sleeping beside", "graze at", "holding"]
_OBJECTS = ["a lemon tree", "the flowers", "a red car", "a wooden table", "the grass", "a ball",
            "a small boat", "the snow", "a white wall", "an old bridge"]
_ADJECTIVES = ["young", "old", "small", "large", "brown", "white", "happy", "wet", "snowy", "sunny"]
_TIMES = ["at night", "in the morning", "on a sunny day", "in winter", "at snowy night", ""]
_CONCEPTS = ["animal", "person", "portrait", "food", "vehicle", "building", "landscape", "plant",
             "sport", "event"]


def tiny_corpus(n_sentences: int = 400, seed: int = SEED) -> list[str]:
    """Caption-like sentences from a fixed grammar (deterministic for a given seed).

    Covers the vocabulary of the paper's examples (``animal``, ``goat on island``, ``a goat
    eating leaves of a lemon tree on the island``, ``portrait``, ``frog``, ...), the NLI
    template ``a picture of: "..."``, chat and completer prompt words.
    """
    rng = random.Random(seed)
    sentences = [
        "animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island",
        "portrait", "frog", "goats graze at snowy night", "goat on island with flowers",
        'a picture of: "a goat on an island"', "Shorten the caption.", "What general concept includes it?",
        "Fill in the blank: A picture of a ___", "Answer with the text inside quotation marks.",
    ]
    for _ in range(n_sentences):
        subject = rng.choice(_ANIMALS + _PEOPLE)
        adjective = rng.choice(_ADJECTIVES)
        form = rng.randrange(5)
        if form == 0:
            text = f"a {adjective} {subject} {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)} in the {rng.choice(_PLACES)}"
        elif form == 1:
            text = f"{subject} on {rng.choice(_PLACES)} {rng.choice(_TIMES)}"
        elif form == 2:
            text = f'a picture of: "a {subject} {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)}"'
        elif form == 3:
            text = f"{rng.choice(_CONCEPTS)} => {subject} => {subject} in the {rng.choice(_PLACES)}"
        else:
            text = f"The {adjective} {subject} is {rng.choice(_ACTIONS)} {rng.choice(_OBJECTS)}, {rng.choice(_TIMES)}."
        sentences.append(" ".join(text.split()))
    return sentences


# --------------------------------------------------------------------------- tokenizers


def _byte_level_bpe(specials: list[str], vocab_size: int, lowercase: bool = False):
    """A GPT-2/Llama/BART/CLIP-style byte-level BPE: encodes any text, decodes it exactly."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tok


def _wrap(tok, **special_tokens):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)


def _llama_tokenizer(model_max_length: int):
    from tokenizers import processors

    tok = _byte_level_bpe(["<unk>", "<s>", "</s>"], vocab_size=512)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    # Like Llama-2: bos/eos/unk but no pad token; hierarcaps.models sets pad = eos.
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                 model_max_length=model_max_length)


def _t5_tokenizer():
    """A sentencepiece-like (Metaspace) BPE whose alphabet lacks → and ← (they become <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # Printable ASCII only: like the real T5 vocabulary, no arrows.
    alphabet = [chr(c) for c in range(33, 127)]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer=trainer)
    eos = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return _wrap(tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512)


def _bart_tokenizer():
    from tokenizers import processors

    tok = _byte_level_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], vocab_size=512)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), add_prefix_space=False
    )
    return _wrap(tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                 mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=256)


def _clip_tokenizer():
    from tokenizers import processors

    tok = _byte_level_bpe(["<|startoftext|>", "<|endoftext|>"], vocab_size=512, lowercase=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)],
    )
    # As in openai/clip-vit-*: pad with <|endoftext|>, 77 positions.
    return _wrap(tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                 pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


def _bert_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        tiny_corpus(), trainer=trainers.WordPieceTrainer(vocab_size=512, special_tokens=specials,
                                                         show_progress=False)
    )
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return _wrap(tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                 mask_token="[MASK]", model_max_length=128)


# --------------------------------------------------------------------------- models

_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}[INST] <<SYS>>\n{{ message['content'] }}\n<</SYS>>\n\n"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}[INST] {% endif %}"
    "{{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ message['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def _llama(out_dir: Path, chat: bool) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    # Few-shot prompts of ten seed hierarchies run to ~400 tokens; rotary positions cost no weights.
    tokenizer = _llama_tokenizer(model_max_length=1024)
    if chat:
        tokenizer.chat_template = _CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _seq2seq(out_dir: Path) -> None:
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _nli(out_dir: Path, shuffled: bool) -> None:
    from transformers import BartConfig, BartForSequenceClassification

    tokenizer = _bart_tokenizer()
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=256, num_labels=3, id2label=dict(NLI_LABELS),
        label2id={v: k for k, v in NLI_LABELS.items()},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    model = BartForSequenceClassification(config)
    head = model.classification_head.out_proj
    with torch.no_grad():
        # Default init (std 0.02) gives ~uniform probabilities; wider logits make label-order
        # mistakes visible in tests.
        head.weight.normal_(0.0, 1.0)
        head.bias.normal_(0.0, 1.0)
    if shuffled:
        # Permute the head's output rows and relabel: logit for each *label* is unchanged.
        with torch.no_grad():
            head.weight.copy_(head.weight[NLI_SHUFFLE].clone())
            head.bias.copy_(head.bias[NLI_SHUFFLE].clone())
        model.config.id2label = dict(NLI_SHUFFLED_LABELS)
        model.config.label2id = {v: k for k, v in NLI_SHUFFLED_LABELS.items()}
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _hf_clip(out_dir: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            # CLIPTextTransformer pools at the first position holding eos_token_id (any id but 2).
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32,
    )
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


OPEN_CLIP_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


def _open_clip(out_dir: Path) -> None:
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    model = open_clip.CLIP(**OPEN_CLIP_MODEL_CFG)
    config = {
        "model_cfg": OPEN_CLIP_MODEL_CFG,
        "preprocess_cfg": {"size": 32, "mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                           "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))


def _text_encoder(out_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    tokenizer = _bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "causal_lm": lambda d: _llama(d, chat=False),
    "chat_lm": lambda d: _llama(d, chat=True),
    "seq2seq": _seq2seq,
    "nli": lambda d: _nli(d, shuffled=False),
    "nli_shuffled": lambda d: _nli(d, shuffled=True),
    "hf_clip": _hf_clip,
    "open_clip": _open_clip,
    "text_encoder": _text_encoder,
}
KINDS: tuple[str, ...] = tuple(_BUILDERS)


def build_tiny_model(kind: str, out_dir: Path | str) -> Path:
    """Build a tiny random model of ``kind`` (one of :data:`KINDS`) into ``out_dir``.

    The folder is created if needed and then holds a ``save_pretrained`` model with its
    tokenizer/processor (``open_clip``: ``open_clip_config.json`` + safetensors weights).
    Weights are seeded (``torch.manual_seed``) without disturbing the caller's global RNG.
    Returns ``out_dir`` as a :class:`~pathlib.Path`.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        _BUILDERS[kind](out)
    return out
