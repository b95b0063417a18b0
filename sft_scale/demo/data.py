"""The embedded demo task: short reviews labelled positive/negative, generated deterministically.

The held-out split uses (subject, adjective) pairs that never occur in training, so exact match on
it measures a learned mapping rather than recall of seen strings.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SUBJECTS = [
    "the soup", "the pasta", "the service", "the staff", "the room", "the movie", "the plot",
    "the music", "the screen", "the battery", "the hotel", "the waiter", "the coffee", "the bread",
    "the phone", "the book", "the actors", "the game", "the ending", "the price", "the garden",
    "the train", "the lesson", "the concert",
]
POSITIVE = ["great", "excellent", "lovely", "wonderful", "fantastic", "delightful", "superb",
            "pleasant", "brilliant", "charming", "fresh", "friendly"]
NEGATIVE = ["awful", "terrible", "horrible", "dreadful", "bland", "rude", "boring", "broken",
            "poor", "disappointing", "stale", "noisy"]
TEMPLATES = [
    "{s} was {a}",
    "i thought {s} was really {a}",
    "honestly {s} felt {a}",
    "{s} was {a} and {s2} was {a2}",
    "we found {s} {a} overall",
]
PROMPT = "Review: {text}\nSentiment:"


def _review(rng: random.Random, pairs: list[tuple[str, str]]) -> str:
    s, a = rng.choice(pairs)
    s2, a2 = rng.choice(pairs)
    return rng.choice(TEMPLATES).format(s=s, a=a, s2=s2, a2=a2)


def make_examples(seed: int = 0, n_train: int = 600, n_eval: int = 100) -> tuple[list, list]:
    rng = random.Random(seed)
    pairs = {lab: [(s, a) for s in SUBJECTS for a in adjs]
             for lab, adjs in (("positive", POSITIVE), ("negative", NEGATIVE))}
    splits = {"train": {}, "eval": {}}
    for lab, ps in pairs.items():
        rng.shuffle(ps)
        cut = len(ps) // 5  # a fifth of the pairs are held out
        splits["eval"][lab], splits["train"][lab] = ps[:cut], ps[cut:]

    def build(split: str, n: int) -> list[dict]:
        out = []
        for i in range(n):
            lab = "positive" if i % 2 == 0 else "negative"
            text = _review(rng, splits[split][lab])
            out.append({"prompt": PROMPT.format(text=text), "answer": " " + lab})
        rng.shuffle(out)
        return out

    return build("train", n_train), build("eval", n_eval)


def pretraining_corpus(seed: int = 1, n: int = 1500) -> list[str]:
    """Unlabelled text: what the tiny base 'read' before fine-tuning. Like a real base it has
    learnt that "awful" goes with being unhappy (so its representations carry polarity) and it
    knows the words positive/negative, but it has never seen the task's "Sentiment:" format, so it
    cannot do the task until SFT teaches it."""
    rng = random.Random(seed)
    corpus = []
    for i in range(n):
        mood, adjs = (("happy", POSITIVE) if i % 2 == 0 else ("unhappy", NEGATIVE))
        pairs = [(s, a) for s in SUBJECTS for a in adjs]
        corpus.append(f"{_review(rng, pairs)} so we were {mood}")
    for _ in range(n // 3):
        s, a = rng.choice([(s, a) for s in SUBJECTS for a in POSITIVE + NEGATIVE])
        corpus.append(f"{s} was {a} and it left a {rng.choice(['positive', 'negative'])} note")
    rng.shuffle(corpus)
    return corpus


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def classification_examples(seed: int = 2) -> tuple[list, list]:
    """The same held-out design as text + label records, for the classification head."""
    train, ev = make_examples(seed=seed, n_train=400, n_eval=100)

    def conv(rows):
        return [{"text": r["prompt"].split("\n")[0].removeprefix("Review: "),
                 "label": r["answer"].strip()} for r in rows]
    return conv(train), conv(ev)


def main() -> None:  # python -m sft_scale.demo.data [OUT_DIR] regenerates the shipped files
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sft_scale/assets")
    train, ev = make_examples()
    write_jsonl(train, out / "demo_train.jsonl")
    write_jsonl(ev, out / "demo_eval.jsonl")
    train, ev = classification_examples()
    write_jsonl(train, out / "sentiment_train.jsonl")
    write_jsonl(ev, out / "sentiment_eval.jsonl")


if __name__ == "__main__":
    main()
