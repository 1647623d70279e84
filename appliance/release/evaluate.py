"""The evaluation set and its scoring: accuracy needs an answer key.

The shipped set (appliance/release/evalset/, its README says what is in it and its licence) is what a branch's
users ask, with a machine-checkable rubric per item; the branch's fact sheet there is the system prompt, so every
answer can be checked against it. A branch adds its own items in the same format ([release] eval_sets), and may
score against its own fact sheet instead ([release] eval_profile: then only its own items count). An item
passes when every must_include group has a match, no must_not_include string appears, and for a multiple-choice
item the first option letter the answer names is the key. Answers are greedy, so a score is repeatable.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from appliance.backends.client import Backend
from appliance.errors import BackendError, ConfigError

EVALSET = Path(__file__).parent / "evalset"
CHOICE = re.compile(r"(?<![A-Za-z])([A-D])(?![A-Za-z])")


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    question: str
    must_include: tuple[tuple[str, ...], ...]
    must_not_include: tuple[str, ...]
    choice: str


def load_items(extra: tuple[str, ...] = (), limit: int = 0, shipped: bool = True) -> list[Item]:
    """The shipped items (unless the branch scores against its own fact sheet) and the branch's; `limit` keeps the
    first items of each category in turn, so a short run still covers every kind of question."""
    items: list[Item] = []
    for path in ((EVALSET / "branch.jsonl",) if shipped else ()) + tuple(map(Path, extra)):
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the evaluation set ({e.strerror})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                items.append(Item(raw["id"], raw["category"], raw["question"],
                                  tuple(tuple(group) for group in raw.get("must_include", [])),
                                  tuple(raw.get("must_not_include", [])), raw.get("choice", "")))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{number}: not an evaluation item ({e}); see "
                                  f"{EVALSET / 'README.md'} for the format") from None
    if len({i.id for i in items}) != len(items):
        raise ConfigError("the evaluation sets share an item id; give the branch's items a prefix of their own")
    if limit:
        by_category: dict[str, list[Item]] = defaultdict(list)
        for item in items:
            by_category[item.category].append(item)
        queues, items = list(by_category.values()), []
        while len(items) < limit and any(queues):
            for queue in queues:
                if queue and len(items) < limit:
                    items.append(queue.pop(0))
    return items


def system_prompt(profile: str = "") -> str:
    """The fact sheet the answers are checked against: the shipped fictional branch's, or the branch's own."""
    path = Path(profile) if profile else EVALSET / "profile.md"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the evaluation fact sheet ({e.strerror})") from None


def _normal(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def passes(item: Item, answer: str) -> bool:
    text = _normal(answer)
    if item.choice:
        named = CHOICE.search(answer.upper() if len(answer.strip()) <= 2 else answer)
        if not named or named.group(1) != item.choice:
            return False
    if any(_normal(word) in text for word in item.must_not_include):
        return False
    return all(any(_normal(word) in text for word in group) for group in item.must_include)


async def run(backend: Backend, items: list[Item], max_tokens: int, parallel: int = 4, profile: str = "",
              before_each=None, progress=None) -> list[dict]:
    """Ask each item of one backend, greedily, with the fact sheet as the system prompt; a failed answer fails its
    item. `before_each` (a coroutine) may hold each question back, e.g. until the box is idle; `progress(done,
    total)` is told after each."""
    system, gate, done = system_prompt(profile), asyncio.Semaphore(parallel), 0

    async def one(item: Item) -> dict:
        nonlocal done
        async with gate:
            if before_each:
                await before_each()
            result = await score(backend, item, system, max_tokens)
        done += 1
        if progress:
            progress(done, len(items))
        return result

    return list(await asyncio.gather(*(one(item) for item in items)))


async def score(backend: Backend, item: Item, system: str, max_tokens: int) -> dict:
    """One item asked and judged; a failed answer fails it."""
    started = time.monotonic()
    try:
        completion = await backend.complete([{"role": "system", "content": system},
                                             {"role": "user", "content": item.question}], max_tokens,
                                            temperature=0.0)
        answer, error = completion.content, ""
    except BackendError as e:
        answer, error = "", str(e)
    return {"id": item.id, "category": item.category, "passed": bool(answer) and passes(item, answer),
            "latency_s": round(time.monotonic() - started, 3), "answer": answer[:500], "error": error}


def table(scores: dict[str, list[dict]]) -> str:
    """Accuracy per category and overall, one column per scored target."""
    names = list(scores)
    categories = sorted({r["category"] for results in scores.values() for r in results})
    width = max(12, *(len(n) for n in names))
    lines = ["category".ljust(14) + "".join(n.rjust(width + 2) for n in names)]
    for category in [*categories, "all"]:
        cells = []
        for name in names:
            rows = [r for r in scores[name] if category in ("all", r["category"])]
            cells.append(f"{sum(r['passed'] for r in rows) / len(rows):6.1%} ({len(rows)})" if rows else "-")
        lines.append(category.ljust(14) + "".join(c.rjust(width + 2) for c in cells))
    return "\n".join(lines)
