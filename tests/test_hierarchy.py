"""The hierarchy data model (hierarcaps.hierarchy): the papers' example hierarchies as parse/format cases,
completer strings in both directions, and every structural rejection of a positive completion."""

from __future__ import annotations

import pytest

from hierarcaps.hierarchy import (
    BACKWARD,
    FORWARD,
    Hierarchy,
    HierarchyError,
    Rejection,
    TrainItem,
    check_completion,
    completer_prompt,
    first_tier,
    format_chain,
    split_chain,
)
from hierarcaps.stats import StageStats

# SPEC section 1 / HierarCaps paper Fig. 3 (a train item).
FIG3_POSITIVE = ("animal", "goat", "goat on island", "a goat eating leaves of a lemon tree on the island")
FIG3_NEGATIVE = ("portrait", "frog", "goats graze at snowy night", "goat on island with flowers blooming in the spring")

# HierarCaps paper, supplementary B.1: seed hierarchies, then few-shot synthetic hierarchies.
B1_EXAMPLES = [
    (
        "cutting tools",
        "scissors",
        "middle-aged woman cutting white fabric with scissors in super slow motion",
        "super slow motion of middle-age woman hands with scissors cutting white fabric on a tabletop",
    ),
    ("dessert", "pie", "decorated pie on a white background", "pie with candles and gifts in boxes on a white background"),
    ("youth", "boys", "boys setting up tent by lake", "teenage boys pitching a tent at the lake in forest"),
    ("music artist", "singer", "singer with group performs at event", "pop singer with group performs at event"),
    (
        "textiles",
        "towels",
        "striped towels",
        "a variety of striped towels in a range of colours and patterns - for sale on amazon",
    ),
    ("flowers", "poppies", "fields of poppies.", "a field of poppies, bright orange, on a sunny day"),
]
# Row 1 of the authors' curated test CSV, as written there.
RELEASE_ROW = "bird => blue bird => blue bird sitting on top of branch => A blue bird sitting on the top of a branch with autumn leaves"
EXAMPLES = [FIG3_POSITIVE, FIG3_NEGATIVE, *B1_EXAMPLES]


# ---------------------------------------------------------------- parse and format


@pytest.mark.parametrize("tiers", EXAMPLES, ids=lambda t: t[1])
def test_paper_hierarchies_format_and_parse_both_ways(tiers: tuple[str, str, str, str]) -> None:
    hierarchy = Hierarchy.of(tiers)
    t1, t2, t3, t4 = tiers
    assert hierarchy.to_release() == f"{t1} => {t2} => {t3} => {t4}"
    assert hierarchy.forward() == f"{t1} → {t2} → {t3} → {t4}"
    assert hierarchy.backward() == f"{t4} ← {t3} ← {t2} ← {t1}"
    assert hierarchy.caption == t4
    assert Hierarchy.from_release(hierarchy.to_release()) == hierarchy
    assert split_chain(hierarchy.forward(), FORWARD) == list(tiers)
    assert split_chain(hierarchy.backward(), BACKWARD) == list(tiers[::-1])


def test_release_row_of_the_curated_test_set_parses() -> None:
    hierarchy = Hierarchy.from_release(RELEASE_ROW)
    assert hierarchy.tiers == (
        "bird",
        "blue bird",
        "blue bird sitting on top of branch",
        "A blue bird sitting on the top of a branch with autumn leaves",
    )
    assert hierarchy.to_release() == RELEASE_ROW


def test_from_release_strips_tier_whitespace() -> None:
    assert Hierarchy.from_release(" animal =>goat=> goat on island  => a goat \n").tiers == FIG3_POSITIVE[:3] + ("a goat",)


@pytest.mark.parametrize("text", ["animal => goat => goat on island", "a => b => c => d => e", "no delimiter", ""])
def test_from_release_needs_exactly_four_tiers(text: str) -> None:
    with pytest.raises(HierarchyError, match="expected 4 tiers"):
        Hierarchy.from_release(text)


def test_hierarchy_validates_its_tiers() -> None:
    with pytest.raises(HierarchyError, match="4 tiers, got 3"):
        Hierarchy.of(["a", "b", "c"])
    with pytest.raises(HierarchyError, match="must be a string"):
        Hierarchy.of(["a", "b", "c", 4])  # type: ignore[list-item]


def test_train_item_pairs_positive_and_negative() -> None:
    item = TrainItem(Hierarchy.of(FIG3_POSITIVE), Hierarchy.of(FIG3_NEGATIVE))
    assert item.positive.tiers[1] == "goat" and item.negative.tiers[1] == "frog"


# ---------------------------------------------------------------- completer strings (B.1)


def test_completer_prompts_match_the_papers_input_target_pairs() -> None:
    t1, t2, t3, t4 = FIG3_POSITIVE
    # Input: T1 →; Target: T2 → T3 → T4
    assert completer_prompt([t1], FORWARD) == "animal →"
    assert format_chain([t2, t3, t4], FORWARD) == f"{t2} → {t3} → {t4}"
    # Input: T1 → T2 →; Target: T3 → T4
    assert completer_prompt([t1, t2], FORWARD) == "animal → goat →"
    # Input: T4 ← T3 ←; Target: T2 ← T1
    assert completer_prompt([t4, t3], BACKWARD) == f"{t4} ← {t3} ←"
    assert format_chain([t2, t1], BACKWARD) == "goat ← animal"
    # k = 0: the bare delimiter tells the direction
    assert completer_prompt([], FORWARD) == "→"
    assert completer_prompt([], BACKWARD) == "←"


def test_negative_hallucination_prompts() -> None:
    """The four forward prompts of step 6: →, T1 →, T1 → T2 →, T1 → T2 → T3 → (not the paper's typo)."""
    prompts = [completer_prompt(FIG3_POSITIVE[:k], FORWARD) for k in range(4)]
    assert prompts == ["→", "animal →", "animal → goat →", "animal → goat → goat on island →"]
    assert [split_chain(p.removesuffix(FORWARD), FORWARD) for p in prompts] == [list(FIG3_POSITIVE[:k]) for k in range(4)]


@pytest.mark.parametrize(
    ("text", "delimiter", "tiers"),
    [
        ("→", FORWARD, ["", ""]),
        ("  ←  ", BACKWARD, ["", ""]),
        ("", FORWARD, []),
        (" \n", FORWARD, []),
        ("animal → goat →", FORWARD, ["animal", "goat", ""]),
        ("a ← b ← c ←", BACKWARD, ["a", "b", "c", ""]),  # a trailing delimiter is not three tiers
        ("goat on island ←  goat\t←\nanimal ", BACKWARD, ["goat on island", "goat", "animal"]),
        ("a ←  ← c", BACKWARD, ["a", "", "c"]),  # empty middle tier kept for check_completion
        ("animal → goat", BACKWARD, ["animal → goat"]),  # the other delimiter does not split
    ],
)
def test_split_chain(text: str, delimiter: str, tiers: list[str]) -> None:
    assert split_chain(text, delimiter) == tiers


@pytest.mark.parametrize(
    ("generated", "tier"),
    [
        ("frog → goats graze at snowy night → goat on island", "frog"),
        ("  goats   graze at snowy night ", "goats graze at snowy night"),
        ("→ portrait", ""),
        ("", ""),
    ],
)
def test_first_tier_reads_up_to_the_next_delimiter(generated: str, tier: str) -> None:
    assert first_tier(generated) == tier


def test_first_tier_with_the_backward_delimiter() -> None:
    assert first_tier("goat ← animal", BACKWARD) == "goat"
    assert first_tier("goat ← animal") == "goat ← animal"


# ---------------------------------------------------------------- check_completion (SPEC 2, step 5)

CAPTION = FIG3_POSITIVE[3]  # 11 words, 50 characters
GOOD_BACKWARD = ["goat on island", "goat", "animal"]  # T3 ← T2 ← T1


def test_paper_completion_passes() -> None:
    assert check_completion(CAPTION, GOOD_BACKWARD) is None
    hierarchy = Hierarchy.from_release(RELEASE_ROW)
    assert check_completion(hierarchy.caption, list(hierarchy.tiers[:3][::-1])) is None


@pytest.mark.parametrize(
    ("backward", "reason"),
    [
        (["goat on island", "goat"], Rejection.WRONG_TIER_COUNT),
        (["goat on island", "goat", "animal", "thing"], Rejection.WRONG_TIER_COUNT),
        ([], Rejection.WRONG_TIER_COUNT),
        (["goat on island", "", "animal"], Rejection.EMPTY_TIER),
        (["goat on island", "goat", "  "], Rejection.EMPTY_TIER),
        (["goat on island", "goat", "goat"], Rejection.IDENTICAL_ADJACENT_TIERS),  # T1 == T2
        (["goat", "goat", "animal"], Rejection.IDENTICAL_ADJACENT_TIERS),  # T2 == T3
        ([CAPTION, "goat", "animal"], Rejection.IDENTICAL_ADJACENT_TIERS),  # T3 == T4
    ],
)
def test_each_structural_rejection(backward: list[str], reason: Rejection) -> None:
    assert check_completion(CAPTION, backward) is reason


def test_empty_caption_is_an_empty_tier() -> None:
    assert check_completion("   ", GOOD_BACKWARD) is Rejection.EMPTY_TIER


def test_t3_must_be_at_least_two_words_shorter() -> None:
    caption = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"  # 14 words
    assert check_completion(caption, ["a b c d e f g h i j k l", "b", "c"]) is None  # 12 words: 2 fewer
    assert check_completion(caption, ["a b c d e f g h i j k l m", "b", "c"]) is Rejection.T3_NOT_TWO_WORDS_SHORTER


def test_t3_must_be_at_least_ten_characters_shorter() -> None:
    caption = "one two three four five six seven eight nine ten"
    assert check_completion(caption, ["x" * (len(caption) - 10), "b", "c"]) is None
    assert check_completion(caption, ["x" * (len(caption) - 9), "b", "c"]) is Rejection.T3_NOT_TEN_CHARS_SHORTER


def test_cheaper_checks_win_when_several_fail() -> None:
    # wrong count beats everything; empty beats identical; words beat characters
    assert check_completion(CAPTION, ["", ""]) is Rejection.WRONG_TIER_COUNT
    assert check_completion(CAPTION, ["", "", "animal"]) is Rejection.EMPTY_TIER
    long_t3 = CAPTION + " and more"
    assert check_completion(CAPTION, [long_t3, "goat", "animal"]) is Rejection.T3_NOT_TWO_WORDS_SHORTER


def test_rejections_are_counted_by_their_value_in_stage_stats() -> None:
    stats = StageStats(stage="complete")
    stats.reject(Rejection.EMPTY_TIER)
    stats.reject("empty_tier", 2)
    assert stats.to_dict()["rejected"] == {"empty_tier": 3}
