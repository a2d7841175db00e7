"""The HierarCaps build stages (SPEC section 2; the paper's supplementary B.1), as plain functions.

Each module holds one stage: a settings dataclass and a function over a batch of rows plus
already loaded components (a :class:`~hierarcaps.generation.TextGenerator`, an NLI scorer)
that returns ``(rows, StageStats)``. No stage loads models, writes files (except the
completer's model folder) or knows about Prefect; the build flow composes them.

* :mod:`~hierarcaps.stages.seeds`      chat-LLM seed hierarchies + all-pairs NLI filter (step 2)
* :mod:`~hierarcaps.stages.augment`    few-shot augmentation with the base LLM (step 3)
* :mod:`~hierarcaps.stages.completer`  completer distillation, seq2seq or causal (step 4)
* :mod:`~hierarcaps.stages.complete`   positive completion ``T4 ←`` with 64 candidates (step 5)
* :mod:`~hierarcaps.stages.negatives`  negative hallucination over up to 8 rounds (step 6)
"""
