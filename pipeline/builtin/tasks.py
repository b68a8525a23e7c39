"""Tiny Alpaca-format instruction tasks for the ~1M-parameter demo pipeline.

Four tasks a tiny model learns in minutes (single-digit addition, word count,
capital of a country, opposite of a word). SFT answers are always correct but
mostly written in a flawed style, so preference learning has a style signal
to fix that a small reward model can actually learn. (Measured on a ~1M-parameter model: a reward model
cannot verify computed answers -- held-out pairwise accuracy 0.49-0.59 on the policy's own right/wrong
samples -- but learns a response style to 0.99.) Stdlib only, so it imports fast.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Callable
from pathlib import Path

# Response styles of SFT rows and their probabilities. The dominant flaw
# (chatter) must outweigh the preferred style: with 50/35 the SFT model's
# greedy output is reliably flawed, so alignment has something to fix.
STYLE_PROBS: dict[str, float] = {
    "preferred": 0.35,  # The answer is X.
    "chatter": 0.50,  # The answer is X. Anyway, whatever.
    "bare": 0.03,  # X
    "rude": 0.03,  # Ugh. The answer is X.
    "repeat": 0.03,  # The answer is X. The answer is X.
    "no_period": 0.03,  # The answer is X
    "lowercase": 0.03,  # the answer is x.
}
assert abs(sum(STYLE_PROBS.values()) - 1.0) < 1e-9

RUDE_PREFIXES = ("Ugh.", "Obviously.", "Seriously?")

TASKS = ("addition", "word_count", "capital", "opposite")

# One-word ASCII capitals only: the answer extractor takes one token.
CAPITALS: dict[str, str] = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Austria": "Vienna",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Belgium": "Brussels",
    "Switzerland": "Bern",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Cuba": "Havana",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Nigeria": "Abuja",
    "Ghana": "Accra",
    "Morocco": "Rabat",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Iceland": "Reykjavik",
}

# One direction per pair and every word used once, so each question has a
# single gold answer (no "old" -> "young"/"new" ambiguity).
OPPOSITES: dict[str, str] = {
    "hot": "cold",
    "big": "small",
    "up": "down",
    "fast": "slow",
    "happy": "sad",
    "light": "dark",
    "open": "closed",
    "old": "young",
    "tall": "short",
    "rich": "poor",
    "hard": "soft",
    "wet": "dry",
    "full": "empty",
    "early": "late",
    "strong": "weak",
    "loud": "quiet",
    "thick": "thin",
    "clean": "dirty",
    "win": "lose",
    "left": "right",
    "day": "night",
    "in": "out",
    "push": "pull",
    "buy": "sell",
    "give": "take",
    "good": "bad",
    "true": "false",
    "yes": "no",
    "first": "last",
    "high": "low",
    "near": "far",
    "begin": "end",
    "inside": "outside",
    "above": "below",
    "before": "after",
    "love": "hate",
    "always": "never",
    "alive": "dead",
    "front": "back",
    "safe": "dangerous",
}

# Lower-case words, no punctuation, so "word" is unambiguous for counting.
WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "fish",
    "sun",
    "moon",
    "tree",
    "house",
    "red",
    "blue",
    "green",
    "small",
    "big",
    "old",
    "new",
    "runs",
    "sits",
    "sleeps",
    "eats",
    "sees",
    "likes",
    "jumps",
    "on",
    "in",
    "under",
    "near",
    "my",
    "your",
    "happy",
    "quiet",
    "today",
    "now",
    "here",
    "slowly",
)

# (instruction, input) templates; "{x}" is the operand. A non-empty input
# template gives the Alpaca "with input" variant, "" the "no input" variant.
_TEMPLATES: dict[str, dict[bool, tuple[tuple[str, str], ...]]] = {
    "addition": {
        False: (
            ("What is {a} plus {b}?", ""),
            ("Add {a} and {b}.", ""),
            ("Compute {a} + {b}.", ""),
        ),
        True: (
            ("Add the two numbers.", "{a} and {b}"),
            ("What is the sum of the given numbers?", "{a} + {b}"),
            ("Calculate the following.", "{a} + {b}"),
        ),
    },
    "word_count": {
        False: (
            ('How many words are in the sentence "{x}"?', ""),
            ("Count the words in this sentence: {x}", ""),
        ),
        True: (
            ("Count the words in the given sentence.", "{x}"),
            ("How many words does the following sentence have?", "{x}"),
        ),
    },
    "capital": {
        False: (
            ("What is the capital of {x}?", ""),
            ("Name the capital city of {x}.", ""),
        ),
        True: (
            ("What is the capital of the given country?", "{x}"),
            ("Name the capital city of this country.", "{x}"),
        ),
    },
    "opposite": {
        False: (
            ("What is the opposite of {x}?", ""),
            ('Give the opposite of the word "{x}".', ""),
        ),
        True: (
            ("What is the opposite of the given word?", "{x}"),
            ("Give the antonym of this word.", "{x}"),
        ),
    },
}

SPLITS: dict[str, tuple[int, int, bool]] = {
    # file name: (rows, seed, styled)
    "sft_train.jsonl": (4000, 0, True),
    "sft_eval.jsonl": (200, 1, True),
    "prompts_label.jsonl": (1000, 2, False),
    "prompts_bon.jsonl": (1000, 3, False),
    "prompts_eval.jsonl": (400, 4, False),
}


def _pick(rng: random.Random, seq):
    # Only rng.random() is used: Python guarantees its sequence for a given
    # seed across versions (choice/randrange/choices are not guaranteed), so
    # the shipped files stay byte-identical on other interpreters.
    return seq[int(rng.random() * len(seq))]


def _draw_style(rng: random.Random) -> str:
    u = rng.random()
    acc = 0.0
    for name, p in STYLE_PROBS.items():
        acc += p
        if u < acc:
            return name
    return "preferred"  # float rounding at u ~ 1.0


def render(style: str, answer: str, rude_prefix: str = RUDE_PREFIXES[0]) -> str:
    """The response text for `answer` in the named style."""
    pref = f"The answer is {answer}."
    if style == "preferred":
        return pref
    if style == "chatter":
        return f"{pref} Anyway, whatever."
    if style == "bare":
        return answer
    if style == "rude":
        return f"{rude_prefix} {pref}"
    if style == "repeat":
        return f"{pref} {pref}"
    if style == "no_period":
        return pref[:-1]
    if style == "lowercase":
        return pref.lower()
    raise ValueError(f"unknown style {style!r}")


def _make_row(rng: random.Random, styled: bool) -> dict:
    task = _pick(rng, TASKS)
    if task == "addition":
        a, b = int(rng.random() * 10), int(rng.random() * 10)
        fields, answer = {"a": a, "b": b}, str(a + b)
    elif task == "word_count":
        k = 2 + int(rng.random() * 5)  # 2..6 words
        sentence = " ".join(_pick(rng, WORDS) for _ in range(k))
        fields, answer = {"x": sentence}, str(k)
    elif task == "capital":
        country = _pick(rng, tuple(CAPITALS))
        fields, answer = {"x": country}, CAPITALS[country]
    else:
        word = _pick(rng, tuple(OPPOSITES))
        fields, answer = {"x": word}, OPPOSITES[word]
    with_input = rng.random() < 0.5
    instr_t, input_t = _pick(rng, _TEMPLATES[task][with_input])
    # Draw style and prefix even when unstyled so styled/unstyled rows of the
    # same seed share their prompts.
    style = _draw_style(rng)
    prefix = _pick(rng, RUDE_PREFIXES)
    output = render(style if styled else "preferred", answer, prefix)
    return {
        "instruction": instr_t.format(**fields),
        "input": input_t.format(**fields),
        "output": output,
        "task": task,
        "answer": answer,
    }


def generate_rows(n: int, seed: int, styled: bool = True) -> list[dict]:
    """n rows from seed; styled=False gives only the preferred style."""
    rng = random.Random(seed)
    return [_make_row(rng, styled) for _ in range(n)]


def write_splits(out_dir: str | Path) -> dict[str, int]:
    """Write all SPLITS as JSONL into out_dir; returns file name -> rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (n, seed, styled) in SPLITS.items():
        rows = generate_rows(n, seed, styled)
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        # Bytes, not text mode: no platform newline translation.
        (out / name).write_bytes(text.encode("utf-8"))
        counts[name] = len(rows)
    return counts


# --- checkers -------------------------------------------------------------

_ANSWER_IS = re.compile(r"\bthe answer is\b\s*:?\s*", re.IGNORECASE)
_TOKEN = re.compile(r"[\"'*]*([^\s.!?,;:\"'*]+)")
# Answer words are letters/digits/hyphens: quotes or markup around the
# answer are not the preferred style.
_PREFERRED_SHAPE = re.compile(r"The answer is [\w-]+(?: [\w-]+)*\.")


def extract_answer(response: str) -> str | None:
    """The stated answer: token after the first "the answer is", else the
    first word (punctuation stripped); None if there is none."""
    m = _ANSWER_IS.search(response)
    if m:
        t = _TOKEN.match(response, m.end())
        return t.group(1) if t else None
    for word in response.split():
        w = word.strip(string.punctuation)
        if w:
            return w
    return None


def answer_correct(row: dict, response: str) -> bool:
    """Stated answer equals the gold answer, case-insensitive."""
    got = extract_answer(response)
    return got is not None and got.casefold() == str(row["answer"]).strip().casefold()


def preferred(row: dict, response: str) -> bool:
    """Exactly `The answer is <gold>.` (gold capitalisation, nothing else)."""
    return response.strip() == f"The answer is {row['answer']}."


def preferred_style(row: dict, response: str) -> bool:
    """Preferred shape with any answer (style only, for diagnostics)."""
    return _PREFERRED_SHAPE.fullmatch(response.strip()) is not None


def classify_style(row: dict, response: str) -> str | None:
    """Which STYLE_PROBS style the response is in for the gold answer
    (ignores the rude prefix wording); None if none matches."""
    ans = str(row["answer"])
    r = response.strip()
    for style in STYLE_PROBS:
        if style == "rude":
            if any(r == render("rude", ans, p) for p in RUDE_PREFIXES):
                return style
        elif r == render(style, ans):
            return style
    return None


CHECKERS: dict[str, Callable[[dict, str], bool]] = {
    "answer_correct": answer_correct,
    "preferred": preferred,
    "preferred_style": preferred_style,
}
