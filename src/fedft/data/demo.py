"""The built-in demo set: a deterministic 8-class task (4 topics x positive/negative) from templates.

It exists so that `fedft run` works offline on a fresh machine. It is made to be learnable by a
pretrained encoder in a few CPU minutes but not by keyword lookup alone: every sentence mixes
topic words with neutral filler and, often, a distractor from another topic, and its tone is
sometimes carried by a negation ("not bad", "far from great"), so a model must weigh the whole
sentence. With 8 classes, a skewed (Dirichlet) partition leaves each client with only a few of
them, which is where federated averaging visibly matters.
"""

from __future__ import annotations

import random

TOPICS = ["sports", "science", "food", "travel"]
LABEL_NAMES = [f"{topic}-{tone}" for topic in TOPICS for tone in ("negative", "positive")]

_TOPIC_WORDS: dict[str, dict[str, list[str]]] = {
    "sports": {
        "subject": [
            "the striker",
            "our goalkeeper",
            "the coach",
            "the home team",
            "the young sprinter",
            "the captain",
            "the tennis champion",
            "the referee",
            "the visiting side",
            "the rookie",
        ],
        "verb": [
            "scored against",
            "defeated",
            "trained with",
            "celebrated with",
            "tackled",
            "outran",
            "lost to",
            "drew with",
            "substituted",
            "challenged",
        ],
        "object": [
            "the league leaders",
            "the rival club",
            "a penalty",
            "the final whistle",
            "the championship trophy",
            "the relay team",
            "a hat trick",
            "the defenders",
            "the season opener",
            "extra time",
        ],
        "place": [
            "at the stadium",
            "on the pitch",
            "in the playoffs",
            "during the derby",
            "at the arena",
            "before kickoff",
            "on the court",
            "in the second half",
        ],
    },
    "science": {
        "subject": [
            "the researchers",
            "a physicist",
            "the lab",
            "the chemist",
            "our telescope",
            "the biologist",
            "a new study",
            "the engineers",
            "the probe",
            "the geneticist",
        ],
        "verb": [
            "measured",
            "discovered",
            "simulated",
            "sequenced",
            "observed",
            "published",
            "synthesized",
            "modelled",
            "detected",
            "tested",
        ],
        "object": [
            "a distant galaxy",
            "the protein structure",
            "a quantum effect",
            "the gene variant",
            "new molecules",
            "the particle decay",
            "the neural signal",
            "a faint exoplanet",
            "the crystal lattice",
            "the climate data",
        ],
        "place": [
            "in the laboratory",
            "at the observatory",
            "under the microscope",
            "in the journal",
            "at the institute",
            "in the reactor",
            "during the experiment",
            "in the clean room",
        ],
    },
    "food": {
        "subject": [
            "the chef",
            "my grandmother",
            "the bakery",
            "a food critic",
            "the waiter",
            "the pastry cook",
            "our kitchen",
            "the street vendor",
            "the sommelier",
            "the diner",
        ],
        "verb": [
            "roasted",
            "tasted",
            "seasoned",
            "baked",
            "served",
            "grilled",
            "recommended",
            "simmered",
            "plated",
            "sliced",
        ],
        "object": [
            "the garlic bread",
            "a spicy curry",
            "fresh pasta",
            "the chocolate cake",
            "a bowl of ramen",
            "the vegetable soup",
            "the sourdough loaf",
            "grilled salmon",
            "the lemon tart",
            "a ripe cheese",
        ],
        "place": [
            "in the kitchen",
            "at the bistro",
            "over a low flame",
            "at the market",
            "in the oven",
            "at dinner",
            "on the menu",
            "at the food festival",
        ],
    },
    "travel": {
        "subject": [
            "the tourists",
            "a backpacker",
            "the tour guide",
            "our pilot",
            "the hotel",
            "the travel agent",
            "the passengers",
            "a hiker",
            "the cruise ship",
            "the airline",
        ],
        "verb": [
            "booked",
            "explored",
            "visited",
            "flew to",
            "sailed past",
            "photographed",
            "hiked through",
            "checked into",
            "toured",
            "missed",
        ],
        "object": [
            "the old harbour",
            "a mountain village",
            "the night train",
            "the famous museum",
            "a quiet beach",
            "the city walls",
            "the border crossing",
            "the island ferry",
            "a desert canyon",
            "the airport lounge",
        ],
        "place": [
            "on the trip",
            "abroad",
            "along the coast",
            "during the holiday",
            "with a rental car",
            "in the old town",
            "at the terminal",
            "on the tour",
        ],
    },
}

_NEUTRAL_OPENERS = [
    "yesterday",
    "this morning",
    "last week",
    "apparently",
    "once again",
    "as expected",
    "surprisingly",
    "in the end",
    "according to reports",
    "by noon",
]
_NEUTRAL_CLOSERS = [
    "and everyone talked about it",
    "which surprised nobody",
    "for the first time",
    "despite the rain",
    "after a long wait",
    "as the crowd watched",
    "and it was a close call",
    "before the news broke",
    "to mixed reactions",
    "",
]


_POSITIVE = [
    "wonderful",
    "brilliant",
    "a delight",
    "superb",
    "a real triumph",
    "lovely",
    "impressive",
    "great fun",
]
_NEGATIVE = [
    "dreadful",
    "a disaster",
    "boring",
    "awful",
    "a huge letdown",
    "terrible",
    "disappointing",
    "a mess",
]
_TONE_FRAMES = [
    "and it was {}",
    "which felt {}",
    "and honestly it was {}",
    "; critics called it {}",
    "- simply {}",
]


def _tone(rng: random.Random, positive: bool) -> str:
    # One time in four the tone comes through negating the opposite word.
    if rng.random() < 0.25:
        word = rng.choice(_NEGATIVE if positive else _POSITIVE)
        return rng.choice(_TONE_FRAMES).format(
            rng.choice(["not ", "far from ", "anything but "]) + word
        )
    return rng.choice(_TONE_FRAMES).format(rng.choice(_POSITIVE if positive else _NEGATIVE))


def _sentence(rng: random.Random, label: int) -> str:
    topic, positive = divmod(label, 2)
    words = _TOPIC_WORDS[TOPICS[topic]]
    parts = [rng.choice(words["subject"]), rng.choice(words["verb"]), rng.choice(words["object"])]
    # A distractor: one slot taken from another topic, so no single word decides the class.
    if rng.random() < 0.45:
        other = TOPICS[rng.choice([i for i in range(len(TOPICS)) if i != topic])]
        slot = rng.choice(["subject", "object"])
        parts[0 if slot == "subject" else 2] = rng.choice(_TOPIC_WORDS[other][slot])
    place = rng.choice(words["place"]) if rng.random() < 0.6 else ""
    opener = rng.choice(_NEUTRAL_OPENERS) + "," if rng.random() < 0.5 else ""
    closer = rng.choice(_NEUTRAL_CLOSERS) if rng.random() < 0.4 else ""
    text = " ".join(p for p in [opener, *parts, place, closer, _tone(rng, bool(positive))] if p)
    return text[0].upper() + text[1:] + "."


def demo_rows(n: int, seed: int) -> list[tuple[str, int]]:
    """n (text, label) rows with balanced labels; the same seed always gives the same rows."""
    rng = random.Random(seed)
    rows = [(_sentence(rng, i % len(LABEL_NAMES)), i % len(LABEL_NAMES)) for i in range(n)]
    rng.shuffle(rows)
    return rows


DEMO_TRAIN_SIZE = 2400
DEMO_TEST_SIZE = 600
DEMO_PUBLIC_SIZE = 1200


def demo_splits() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """The fixed train and test splits of the demo set (different seeds, so no shared draws)."""
    return demo_rows(DEMO_TRAIN_SIZE, seed=20240611), demo_rows(DEMO_TEST_SIZE, seed=20240612)


def demo_public_texts() -> list[str]:
    """The demo set's public split: unlabeled texts for a server that distils (`fedpft`, `fedpt`).

    No client holds them: they are drawn with a seed of their own, and any sentence that the
    templates happen to give the train or test split too is dropped (as are repeats), so the
    server never distils on a client's row or on the rows that score the run."""
    train, test = demo_splits()
    held = {text for text, _ in train} | {text for text, _ in test}
    texts = list(dict.fromkeys(t for t, _ in demo_rows(2 * DEMO_PUBLIC_SIZE, seed=20240613)))
    public = [t for t in texts if t not in held][:DEMO_PUBLIC_SIZE]
    assert len(public) == DEMO_PUBLIC_SIZE  # the templates give far more distinct sentences
    return public
