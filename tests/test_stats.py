"""Stage stats: merging shards keeps integer counts, does not multiply per-stage figures, derives rates."""

from __future__ import annotations

import json

from hierarcaps.stats import StageStats, merge_all


def _shard(calls: int, tokens: int, pairs: int, seconds: float, stopped: int) -> StageStats:
    """A shard's stats as the build stores them: written to stats.json and read back."""
    stats = StageStats(stage="augment", items_in=10, kept=8, seconds=seconds,
                       extra={"generate_calls": calls, "generated_tokens": tokens, "nli_pairs_scored": pairs,
                              "seed_hierarchies": 900, "stopped_early": stopped})
    stats.reject("duplicate", 2)
    return StageStats.from_dict(json.loads(json.dumps(stats.to_dict())))


def test_merged_counts_stay_integers_and_constants_are_not_multiplied() -> None:
    shards = [_shard(3, 300, 40, 2.0, 0), _shard(5, 500, 60, 3.0, 1), _shard(2, 200, 0, 5.0, 0)]
    folded = StageStats(stage="augment")  # the fold the build used to merge shards
    for shard in shards:
        folded = folded.merge(shard)
    for merged in (folded, merge_all("augment", shards)):
        assert merged.extra["generate_calls"] == 10 and type(merged.extra["generate_calls"]) is int
        assert merged.extra["generated_tokens"] == 1000 and type(merged.extra["generated_tokens"]) is int
        assert merged.extra["seed_hierarchies"] == 900  # every shard saw the same 900 seeds, not 3 x 900
        assert merged.extra["stopped_early"] == 1  # a flag: some shard stopped early
        assert merged.items_in == 30 and merged.kept == 24 and merged.rejected == {"duplicate": 6}
        assert json.dumps(merged.to_dict()["extra"]) == json.dumps(
            {"generate_calls": 10, "generated_tokens": 1000, "nli_pairs_scored": 100,
             "seed_hierarchies": 900, "stopped_early": 1})


def test_rates_come_from_summed_counts_not_summed_rates() -> None:
    merged = merge_all("complete_train", [_shard(1, 300, 40, 2.0, 0), _shard(1, 700, 160, 8.0, 0)])
    # per-shard rates are 150 and 87.5 tokens/s; the stage's is 1000 tokens / 10 s
    assert merged.to_dict()["throughput"] == {"tokens_per_s": 100.0, "pairs_per_s": 20.0}
    assert StageStats(stage="captions").throughput() == {"tokens_per_s": 0.0, "pairs_per_s": 0.0}
