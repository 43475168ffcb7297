"""Deterministic tool-calling rows in LLaMA-Factory's ShareGPT form (its glaive_toolcall demo's shape),
and a small text corpus, for tests and demos of the formats beyond alpaca/messages.

A tool row has `conversations` of `{from, value}` (human, function_call, observation, gpt) and
`tools` as a JSON string of function schemas. `BAD_TOOL_ROWS` break one gate rule each.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from kftune.dev.sample_data import generate_samples

FUNCTIONS = {
    "get_weather": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city"}},
            "required": ["city"],
        },
    },
    "get_news": {
        "name": "get_news",
        "description": "Get the latest news headlines of a category",
        "parameters": {
            "type": "object",
            "properties": {"category": {"type": "string", "description": "the news category"}},
            "required": ["category"],
        },
    },
    "calculate_tip": {
        "name": "calculate_tip",
        "description": "Calculate the tip for a bill",
        "parameters": {
            "type": "object",
            "properties": {
                "bill_amount": {"type": "number", "description": "the bill"},
                "tip_percentage": {"type": "number", "description": "the tip in percent"},
            },
            "required": ["bill_amount", "tip_percentage"],
        },
    },
}
CITIES = ("Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Denver", "Hanoi", "Quito", "Perth", "Seoul")
CATEGORIES = ("sports", "science", "politics", "music", "travel", "health", "business", "film")
WEATHER = ("sunny", "cloudy", "rainy", "windy", "snowy")


def _call(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    """(question, function, arguments, result, answer) of one call."""
    kind = rng.choice(sorted(FUNCTIONS))
    if kind == "get_weather":
        city, sky, degrees = rng.choice(CITIES), rng.choice(WEATHER), rng.randint(-5, 35)
        return (
            rng.choice(
                ("What is the weather like in {} right now?", "How warm is it in {} today?", "Weather in {}?")
            ).format(city),
            kind,
            {"city": city},
            {"city": city, "weather": sky, "temperature": degrees},
            f"It is {sky} in {city} at {degrees} degrees.",
        )
    if kind == "get_news":
        category = rng.choice(CATEGORIES)
        headline = f"{category.title()} headline number {rng.randint(1, 99)}"
        return (
            rng.choice(("Can you get me the latest {} news?", "Any {} headlines today?", "What is new in {}?")).format(
                category
            ),
            kind,
            {"category": category},
            {"headlines": [headline]},
            f"The latest {category} news: {headline}.",
        )
    bill, tip = rng.randint(10, 200), rng.choice((10, 15, 20))
    return (
        f"I need help calculating the tip for my bill of {bill} dollars at {tip} percent.",
        kind,
        {"bill_amount": bill, "tip_percentage": tip},
        {"tip_amount": round(bill * tip / 100, 2)},
        f"The tip for your bill is {round(bill * tip / 100, 2)} dollars.",
    )


def tool_rows(rows: int, seed: int = 0) -> list[dict]:
    """`rows` ShareGPT tool-calling rows, each question asked once (one in five answers without a call, as
    glaive's do)."""
    rng = random.Random(seed)
    out, asked = [], set()
    for i in range(rows):
        question, name, arguments, result, answer = _call(rng)
        while question in asked:
            question, name, arguments, result, answer = _call(rng)
        asked.add(question)
        tools = [FUNCTIONS[name], FUNCTIONS[rng.choice([n for n in sorted(FUNCTIONS) if n != name])]]
        rng.shuffle(tools)
        if i % 5 == 4:
            turns = [("human", f"Hello, how are you today? ({i})"), ("gpt", "I am fine, thank you. How can I help?")]
        else:
            turns = [
                ("human", question),
                ("function_call", json.dumps({"name": name, "arguments": arguments})),
                ("observation", json.dumps(result)),
                ("gpt", answer),
            ]
        out.append({"conversations": [{"from": f, "value": v} for f, v in turns], "tools": json.dumps(tools)})
    return out


def _bad(turns: list[tuple[str, str]]) -> dict:
    return {
        "conversations": [{"from": f, "value": v} for f, v in turns],
        "tools": json.dumps([FUNCTIONS["get_weather"]]),
    }


# One row per rule: an undeclared function, arguments that are not JSON, a result without a call.
BAD_TOOL_ROWS = {
    "tools.undeclared_function": _bad(
        [
            ("human", "Book me a flight to Oslo."),
            ("function_call", json.dumps({"name": "book_flight", "arguments": {"city": "Oslo"}})),
            ("observation", '{"status": "booked"}'),
            ("gpt", "Your flight to Oslo is booked."),
        ]
    ),
    "tools.arguments_not_json": _bad(
        [
            ("human", "What is the weather in Lima?"),
            ("function_call", '{"name": "get_weather", "arguments": "city=Lima"}'),
            ("observation", '{"weather": "sunny"}'),
            ("gpt", "It is sunny in Lima."),
        ]
    ),
    "tools.result_without_call": _bad(
        [
            ("human", "What is the weather in Perth?"),
            ("observation", '{"weather": "rainy"}'),
            ("gpt", "It is rainy in Perth."),
        ]
    ),
}


DEMO_FILE = (
    "data/glaive_toolcall_demo.jsonl"  # committed: 60 rows, then one bad row per tool rule (4.8%: the gate passes)
)


def demo_rows() -> list[dict]:
    """What DEMO_FILE holds (a test keeps the two equal)."""
    return tool_rows(60) + list(BAD_TOOL_ROWS.values())


def text_rows(rows: int, seed: int = 0) -> list[dict]:
    """`rows` {"text"} documents for continued pretraining: the sample posts, without their prompts."""
    return [{"text": row["output"]} for row in generate_samples(rows, "alpaca", seed)]


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
