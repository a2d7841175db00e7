"""Prompt templates, chat vs Llama-2 wrapping, and the batched TextGenerator (tiny models)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from hierarcaps.generation import TextGenerator, cut_at_stops
from hierarcaps.prompting import SEED_PROMPTS, ChatPrompt, PromptError, load_prompt, render_prompts, wrap_chat
from hierarcaps.stages.completer import add_delimiter_tokens

# ------------------------------------------------------------------ templates (paper, Fig. 7)


def test_seed_prompts_are_the_papers_with_partial_answers() -> None:
    shorten, fill, concept = (load_prompt(name) for name in SEED_PROMPTS)
    assert shorten.instruction == (
        "Shorten the following image caption. Feel free to remove details.\n"
        'Put your answer in quotation marks: " "\n\n"{}"'
    )
    assert shorten.partial_answer == (
        "Sure! Here is the original caption and its shortened version:\n\n"
        'Original caption: "{}"\nShortened version:'
    )
    assert fill.instruction.startswith('You are given the following caption to an image:\n\n"{}"\n')
    assert fill.instruction.endswith('"A picture of (a/the) ___ ."')
    assert fill.partial_answer == 'The best word or words to fill in the blank would be: "A picture of (a/the)'
    assert concept.instruction == (
        'What term describes a general concept that includes "{}"?\n'
        'Answer in one or two words, and put your answer in quotation marks: " "'
    )
    assert concept.partial_answer == 'The best term that includes the given word or phrase is "'
    # Only the first prompt lets the model open its own quotation.
    assert [p.answer_opens_quote for p in (shorten, fill, concept)] == [False, True, True]


def test_fill_replaces_every_slot_and_leaves_braces_in_text_alone() -> None:
    instruction, answer = load_prompt("seed_shorten").fill("a {weird} caption")
    assert instruction.count("a {weird} caption") == 1 and "{}" not in instruction
    assert answer.count("a {weird} caption") == 1


def test_malformed_template_names_the_prompt() -> None:
    with pytest.raises(PromptError, match="broken"):
        ChatPrompt.parse("broken", "no markup here")
    with pytest.raises(PromptError, match="nonexistent"):
        load_prompt("nonexistent")


def test_llama2_markup_without_chat_template(tiny_causal_lm_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    assert not tokenizer.chat_template
    text = wrap_chat(tokenizer, "Shorten it.", 'Sure: "')
    assert text == '[INST] Shorten it. [/INST] Sure: "'


def test_chat_template_puts_partial_answer_at_start_of_open_assistant_turn(tiny_chat_lm_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    prompt = load_prompt("seed_general_concept")
    (text,) = render_prompts(tokenizer, prompt, ["goat on island"])
    instruction, answer = prompt.fill("goat on island")
    assert text.startswith(tokenizer.bos_token + "[INST] " + instruction)
    # The assistant turn is left open: the text ends with the partial answer, no eos after it.
    assert text.endswith("[/INST] " + answer)
    assert tokenizer.eos_token not in text


# ------------------------------------------------------------------ TextGenerator plumbing


@pytest.fixture(scope="module")
def causal(tiny_causal_lm_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir), AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


def test_generate_shapes_seed_determinism_and_call_count(causal) -> None:
    generator = TextGenerator(*causal)
    prompts = ["a goat on the island", "dog", "a picture of a cat"]
    first = generator.generate(prompts, num_return_sequences=4, max_new_tokens=6, seed=3)
    assert len(first) == 3 and all(len(samples) == 4 for samples in first)
    assert generator.generate_calls == 1 and generator.sequences_generated == 12
    assert generator.generate(prompts, num_return_sequences=4, max_new_tokens=6, seed=3) == first
    assert generator.generate(prompts, num_return_sequences=4, max_new_tokens=6, seed=4) != first
    assert generator.generate_calls == 3


def test_generation_does_not_touch_the_global_rng(causal) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TextGenerator(*causal).generate(["dog"], max_new_tokens=3, seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_left_padding_gives_each_prompt_the_same_continuation_alone_or_batched(causal) -> None:
    """Near-greedy sampling (tiny temperature): padding and attention mask must not change the text."""
    generator = TextGenerator(*causal)
    short, long = "dog", "a young goat eating leaves of a lemon tree on the island"
    alone = generator.generate([short], temperature=1e-4, max_new_tokens=8)[0][0]
    batched = generator.generate([long, short], temperature=1e-4, max_new_tokens=8)[1][0]
    assert alone == batched
    # the continuation excludes the prompt
    assert not batched.startswith(short)


def test_chat_prompt_gets_a_single_bos(tiny_chat_lm_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm_dir)
    generator = TextGenerator(AutoModelForCausalLM.from_pretrained(tiny_chat_lm_dir), tokenizer)
    (prompt,) = render_prompts(tokenizer, load_prompt("seed_shorten"), ["a goat on the island"])
    ids = generator._tokenize([prompt])["input_ids"][0].tolist()
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    plain = generator._tokenize(["[INST] hello [/INST]"])["input_ids"][0].tolist()
    assert plain[0] == tokenizer.bos_token_id  # the tokenizer adds it when the text lacks it


def test_newline_stop_cuts_every_sample(causal) -> None:
    generator = TextGenerator(*causal)
    samples = generator.generate(["goat\n"] * 2, num_return_sequences=8, max_new_tokens=24, stop_at_newline=True)
    newline_tokens = generator._tokens_containing("\n")
    assert newline_tokens and set(newline_tokens) <= set(generator._eos_ids(["\n"]))
    assert all("\n" not in text for batch in samples for text in batch)


def test_generate_with_status_flags_stopped_and_cut_off_samples(causal) -> None:
    """Near-greedy sampling: each prompt's one new token is the argmax of the model's next-token logits.

    A stop string inside prompt A's greedy token ends A (finished); prompt B's greedy token lacks
    it, so B runs out of ``max_new_tokens=1`` (cut off) — both in one batched generate call. Then
    A's greedy token as an extra end-of-sequence id (generation config) finishes A by its id alone.
    """
    model, tokenizer = causal
    generator = TextGenerator(model, tokenizer)
    candidates = ["a", "dog", "a goat on the island", "boys pitching a tent", "a picture of a cat", "the"]
    with torch.no_grad():
        greedy = model(**generator._tokenize(candidates)).logits[:, -1].argmax(-1).tolist()
    words = [tokenizer.decode([i]) for i in greedy]
    a = next(i for i, w in enumerate(words) if w.strip().isalpha())  # a clean word token
    b = next(i for i, w in enumerate(words) if words[a] not in w and greedy[i] not in generator._eos_ids([]))
    prompts = [candidates[a], candidates[b]]
    result = generator.generate_with_status(prompts, temperature=1e-4, max_new_tokens=1, stop_strings=[words[a]])
    assert generator.generate_calls == 1
    assert result.finished == [[True], [False]]
    assert result.texts[0] == [""] and result.texts[1] == [words[b]]
    plain = generator.generate_with_status(prompts, temperature=1e-4, max_new_tokens=1)
    assert plain.finished == [[False], [False]]
    assert generator.generate(prompts, temperature=1e-4, max_new_tokens=1) == plain.texts
    # an end-of-sequence id alone (no stop string in the text) also finishes a sample
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, greedy[a]]
    try:
        by_id = generator.generate_with_status(prompts, temperature=1e-4, max_new_tokens=1)
    finally:
        model.generation_config.eos_token_id = original
    assert by_id.finished == [[True], [False]] and by_id.texts == plain.texts


def test_newline_stopped_samples_are_finished_and_cut_off_ones_are_not(causal) -> None:
    """Seeded sampling with a 24-token budget: some samples predict the newline, others run out.

    The same seed with a larger budget replays the same first 24 steps: a sample that finished
    is unchanged; one that was cut off goes on (longer text or, now, a newline).
    """
    generator = TextGenerator(*causal)
    kwargs = dict(num_return_sequences=8, stop_at_newline=True, seed=0)
    short = generator.generate_with_status(["goat\n"] * 2, max_new_tokens=24, **kwargs)
    long = generator.generate_with_status(["goat\n"] * 2, max_new_tokens=64, **kwargs)
    flags = [f for batch in short.finished for f in batch]
    assert any(flags) and not all(flags)
    pairs = zip(*(sum(x, []) for x in (short.texts, short.finished, long.texts, long.finished)))
    for text, finished, text_long, finished_long in pairs:
        if finished:
            assert (text_long, finished_long) == (text, True)
        else:
            assert (text_long, finished_long) != (text, False)


def test_cut_at_stops_uses_the_earliest_stop() -> None:
    assert cut_at_stops("frog → toad\nmore", ["\n", "→"]) == "frog "
    assert cut_at_stops("no stop here", ["\n"]) == "no stop here"


def test_seq2seq_decoding_keeps_added_delimiters_and_drops_pad_eos(tiny_seq2seq_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_seq2seq_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_seq2seq_dir)
    add_delimiter_tokens(tokenizer, model)
    generator = TextGenerator(model, tokenizer)
    ids = tokenizer("goat on island ← goat ← animal")["input_ids"]  # ends with eos
    row = [tokenizer.pad_token_id, *ids, tokenizer.pad_token_id]
    (text,) = generator.decode(torch.tensor([row]))
    assert " ".join(text.split()) == "goat on island ← goat ← animal"
    samples = generator.generate(["goat on island ←", "→"], num_return_sequences=3, max_new_tokens=5)
    assert [len(s) for s in samples] == [3, 3]
    assert all(tokenizer.pad_token not in t and tokenizer.eos_token not in t for s in samples for t in s)


def test_generation_config_eos_ids_also_end_sequences(causal) -> None:
    """Chat models end turns with tokens listed in generation_config (Llama-3: <|eot_id|>)."""
    model, tokenizer = causal
    generator = TextGenerator(model, tokenizer)
    turn_end = tokenizer.convert_tokens_to_ids("<s>")
    original = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, turn_end]
    try:
        assert turn_end in generator._eos_ids([]) and tokenizer.eos_token_id in generator._eos_ids([])
    finally:
        model.generation_config.eos_token_id = original
    assert generator._eos_ids([]) == [tokenizer.eos_token_id]


def test_token_counters_count_prompt_tokens_once_and_samples_up_to_their_end(causal) -> None:
    model, tokenizer = causal
    generator = TextGenerator(model, tokenizer)
    prompts = ["a goat on the island", "dog", "a picture of a cat"]
    out = generator.generate_with_status(prompts, num_return_sequences=4, max_new_tokens=6, seed=3)
    assert not any(f for row in out.finished for f in row)  # no sample ended early: every one ran 6 tokens
    assert generator.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)  # padding excluded
    assert generator.generated_tokens == 12 * 6
    # a stop string ends some samples early: they count up to and including their stop token
    vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    common = max(set("etaoin"), key=lambda ch: sum(ch in t for t in vocabulary))
    stopped = generator.generate_with_status(prompts, num_return_sequences=4, max_new_tokens=6, seed=3,
                                             stop_strings=[common])
    n_finished = sum(f for row in stopped.finished for f in row)
    added = generator.generated_tokens - 12 * 6
    assert 0 < n_finished and (12 - n_finished) * 6 + n_finished <= added < 12 * 6
    assert generator.generate_calls == 2
