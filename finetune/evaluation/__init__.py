"""Evaluation of CLIP-style models on visual-semantic hierarchies (SPEC section 4).

* :mod:`~finetune.evaluation.retrieval`: HierarCaps hierarchical retrieval (precision, recall, tau_d);
* :mod:`~finetune.evaluation.report`: qualitative HTML page, plots, markdown comparison of checkpoints;
* :mod:`~finetune.evaluation.lexical`: HyperLex Spearman rho from exterior angles;
* :mod:`~finetune.evaluation.retention`: text-to-image recall@k and zero-shot classification;
* :mod:`~finetune.evaluation.taxonomy`: RCME / BioCLIP-HC taxonomy metrics;
* :mod:`~finetune.evaluation.suite`: every configured benchmark for one checkpoint;
* :mod:`~finetune.evaluation.cli`: the ``hierarcaps-eval`` command.

Submodules are imported on use, so ``import finetune.evaluation`` stays light.
"""
