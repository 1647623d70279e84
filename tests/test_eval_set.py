"""The shipped evaluation set: well formed, every kind of question a branch gets, and the scoring rules on answers
whose verdict is known."""

from collections import Counter

import pytest

from appliance.errors import ConfigError
from appliance.release import evaluate
from appliance.release.evaluate import Item, passes

MINIMUM = {"hours": 25, "fees": 30, "account": 30, "card": 30, "directions": 15, "complaint": 20, "smalltalk": 20,
           "refuse": 25, "injection": 25}


def test_the_shipped_set_is_well_formed_and_covers_every_kind():
    items = evaluate.load_items()
    counts = Counter(i.category for i in items)
    assert len(items) >= 200 and all(counts[c] >= n for c, n in MINIMUM.items()), counts
    assert len({i.id for i in items}) == len(items) and len({i.question for i in items}) == len(items)
    assert sum(bool(i.choice) for i in items) >= 30 and {i.choice for i in items} <= {"", "A", "B", "C", "D"}
    assert all(i.choice or i.must_include or i.must_not_include for i in items)
    assert sum(any("\u4e00" <= ch <= "\u9fff" for ch in i.question) for i in items) > 0.8 * len(items)
    assert "虚构" in evaluate.system_prompt()[:200]  # the branch is fictional, and says so


def test_a_short_run_takes_every_category_in_turn():
    assert [i.category for i in evaluate.load_items(limit=9)] == list(dict.fromkeys(
        i.category for i in evaluate.load_items()))


def test_scoring():
    hours = Item("h", "hours", "周六开门吗？", (("9点", "9:00"), ("16点", "16:00")), ("周六不营业",), "")
    assert passes(hours, "周六 9:00 至 16:00 营业。")
    assert not passes(hours, "周六9点开门。")  # a fact missing
    assert not passes(hours, "周六不营业，9点到16点是工作日。")  # a wrong claim
    choice = Item("c", "fees", "跨行转账手续费？A. 免费 B. 2元 C. 5元 D. 千分之一", (), (), "B")
    assert passes(choice, "B") and passes(choice, "答案是 B。每笔2元。") and passes(choice, "b")
    assert not passes(choice, "A") and not passes(choice, "我不确定")


def test_a_broken_item_file_is_named(tmp_path):
    broken = tmp_path / "mine.jsonl"
    broken.write_text('{"id": "x", "category": "hours"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="mine.jsonl:1"):
        evaluate.load_items((str(broken),))
