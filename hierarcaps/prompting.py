"""Prompt templates of the build stages and their wrapping for chat or Llama-2 models.

The three seed prompts of the HierarCaps paper (supplementary Fig. 7) ship as text files in
``prompts/`` (package ``hierarcaps.prompts``), written exactly as the paper prints them for
Llama-2-chat::

    [INST]
    <instruction, with {} slots>
    [/INST]

    <partial answer, with {} slots>

The *partial answer* is the start of the assistant turn: the model continues it, so its answer
has a fixed form (e.g. it ends with an open quotation mark and the model writes the quoted
text). :class:`ChatPrompt` splits a file into instruction and partial answer; :func:`wrap_chat`
renders one for a given tokenizer:

* a tokenizer with a chat template (Llama-3, Qwen, Mistral, Llama-2-chat on the hub ...) gets
  its own template, with the partial answer as the unfinished assistant message
  (``continue_final_message``);
* a tokenizer without one gets the Llama-2 markup ``[INST] instruction [/INST] partial``.

``{}`` slots are filled by plain substitution, so texts containing braces are safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

INST_OPEN = "[INST]"
INST_CLOSE = "[/INST]"
SLOT = "{}"

#: The seed prompts in the order they are applied: T4 -> T3, T3 -> T2, T2 -> T1.
SEED_PROMPTS = ("seed_shorten", "seed_fill_blank", "seed_general_concept")


class PromptError(ValueError):
    """A prompt template file is malformed."""


@dataclass(frozen=True)
class ChatPrompt:
    """One instruction prompt with its partial answer (both may hold ``{}`` slots)."""

    name: str
    instruction: str
    partial_answer: str

    @classmethod
    def parse(cls, name: str, text: str) -> "ChatPrompt":
        """Split a ``[INST] ... [/INST] partial answer`` template into its two parts."""
        head, sep, answer = text.partition(INST_CLOSE)
        if not sep or not head.lstrip().startswith(INST_OPEN):
            raise PromptError(
                f"prompt {name!r} must be '{INST_OPEN} instruction {INST_CLOSE} partial answer'; "
                f"found no {INST_OPEN}/{INST_CLOSE} pair"
            )
        instruction = head.lstrip()[len(INST_OPEN):].strip()
        return cls(name=name, instruction=instruction, partial_answer=answer.strip())

    def fill(self, text: str) -> tuple[str, str]:
        """``(instruction, partial_answer)`` with every ``{}`` slot replaced by ``text``."""
        return self.instruction.replace(SLOT, text), self.partial_answer.replace(SLOT, text)

    @property
    def answer_opens_quote(self) -> bool:
        """Whether the partial answer leaves a quotation open, so the answer ends at its close."""
        return self.partial_answer.count('"') % 2 == 1


def load_prompt(name: str) -> ChatPrompt:
    """Read ``prompts/<name>.txt`` from the installed package ``hierarcaps.prompts``."""
    path = resources.files("hierarcaps.prompts").joinpath(f"{name}.txt")
    if not path.is_file():
        raise PromptError(f"no prompt template {name!r}: expected file prompts/{name}.txt in hierarcaps.prompts")
    return ChatPrompt.parse(name, path.read_text(encoding="utf-8"))


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries its own chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def llama2_markup(instruction: str, partial_answer: str) -> str:
    """Llama-2-chat markup: ``[INST] instruction [/INST] partial`` (the tokenizer adds BOS)."""
    return f"{INST_OPEN} {instruction} {INST_CLOSE} {partial_answer}"


def wrap_chat(tokenizer: Any, instruction: str, partial_answer: str) -> str:
    """Render one user turn plus the unfinished assistant turn for ``tokenizer``'s model."""
    if not has_chat_template(tokenizer):
        return llama2_markup(instruction, partial_answer)
    messages = [
        {"role": "user", "content": instruction},
        {"role": "assistant", "content": partial_answer},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def render_prompts(tokenizer: Any, prompt: ChatPrompt, texts: list[str]) -> list[str]:
    """The model inputs for ``prompt`` filled with each of ``texts``."""
    return [wrap_chat(tokenizer, *prompt.fill(t)) for t in texts]
