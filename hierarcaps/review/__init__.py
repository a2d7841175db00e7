"""Human review of built hierarchies: a local web page, verdicts in SQLite, curated export.

``hierarcaps review SOURCE --split test`` serves the page (:mod:`hierarcaps.review.server`);
verdicts go to an append-only SQLite log (:mod:`hierarcaps.review.store`); ``hierarcaps review
export`` writes the curated split and the agreement statistics (:mod:`hierarcaps.review.export`).
"""
