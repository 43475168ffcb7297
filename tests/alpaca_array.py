"""A stand-in for LLaMA-Factory's `alpaca_zh_demo.json` that the tests write themselves.

The real file lives beside the checkout on the machines this project is built on, not in a user's
clone, so every property the tests check on it is also checked on this one: one JSON array (not
JSONL) of Chinese `instruction`/`input`/`output` rows, some with an `input`, answers with Markdown
lists, tables and code blocks, a long tail that a 96-token cutoff rejects, and a few exact copies.
Same (rows, seed) gives the same bytes.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

TOPICS = (
    "咖啡",
    "城市交通",
    "古典诗词",
    "环境保护",
    "人工智能",
    "篮球比赛",
    "家常菜",
    "旅行计划",
    "植物养护",
    "时间管理",
)
ASKS = ("请解释一下{t}的基本概念。", "给我写一段关于{t}的介绍。", "总结{t}的三个要点。", "比较两种常见的{t}方法。")
INPUTS = ("上海，杭州，南京。", "春天的早晨，阳光明媚。", "一个初学者的问题。", "俄克拉荷马城雷霆队，芝加哥公牛队。")
PHRASES = (
    "这是一个值得认真思考的问题",
    "首先需要了解它的历史背景",
    "其次要关注实际的应用场景",
    "很多人在这方面有不同的看法",
    "我们可以从几个角度来分析",
    "最后别忘了总结经验和教训",
    "具体的做法因人而异",
    "坚持练习才能看到明显的进步",
)
CODE = '```python\ndef greet(name):\n    return f"你好，{name}"\n```'
TABLE = "| 项目 | 说明 |\n| --- | --- |\n| 优点 | 简单易学 |\n| 缺点 | 需要耐心 |"


@dataclass(frozen=True)
class AlpacaArray:
    """The file written and what is known about it by construction."""

    path: Path
    rows: int
    exact_copies: int


def _answer(rng: random.Random, index: int, long: bool) -> str:
    """A short answer, or a long one with a list, a table and a code block (the long tail of real data)."""
    sentences = [rng.choice(PHRASES) for _ in range(rng.randint(12, 20) if long else 2)]
    body = "，".join(sentences) + f"。（第{index}条）"
    if not long:
        return body
    steps = "\n".join(f"{n}. {rng.choice(PHRASES)}。" for n in range(1, 5))
    return f"{body}\n\n{steps}\n\n{TABLE}\n\n{CODE}"


def write_alpaca_array(path: Path, rows: int = 200, seed: int = 0, long_share: float = 0.3) -> AlpacaArray:
    """Write `rows` alpaca rows as one JSON array: every 25th row an exact copy of an earlier one."""
    rng = random.Random(seed)
    items: list[dict[str, str]] = []
    copies = 0
    for index in range(rows):
        if index and index % 25 == 0:
            items.append(dict(items[rng.randrange(len(items))]))
            copies += 1
            continue
        topic = TOPICS[index % len(TOPICS)]
        items.append(
            {
                "instruction": rng.choice(ASKS).format(t=topic) + f"（编号{index}）",
                "input": INPUTS[index % len(INPUTS)] if index % 3 == 1 else "",
                "output": _answer(rng, index, long=rng.random() < long_share),
            }
        )
    path.write_text(json.dumps(items, ensure_ascii=False, indent=2), encoding="utf-8")
    return AlpacaArray(path, rows, copies)
