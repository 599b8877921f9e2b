"""Ordinary sentences written for the tests (not taken from any data set): seeded combinations of short,
everyday clauses, so that a test has a few hundred varied, realistic texts from the repository alone."""

from __future__ import annotations

import random

_SUBJECTS = (
    "A man", "A woman", "The child", "Two dogs", "My neighbour", "The old farmer", "A young student", "The team",
    "Our teacher", "The doctor", "A small cat", "The pilot", "Three friends", "The committee", "A tourist",
    "The chef", "Her brother", "The police officer", "A group of hikers", "The president",
)
_ACTIONS = (
    "is playing a guitar", "is slicing an onion", "runs across the field", "reads a newspaper",
    "is cooking dinner", "rides a bicycle", "is painting a fence", "closes the window", "is swimming in a lake",
    "writes a long letter", "is waiting for the bus", "climbs a steep hill", "is fixing a car",
    "sings a quiet song", "is watching the news", "buys fresh bread", "plants a tree", "is talking on the phone",
    "crosses the street", "is feeding the birds",
)
_PLACES = (
    "", " in the park", " at the station", " near the river", " on a rainy morning", " in a busy kitchen",
    " after work", " in front of the house", " at the market", " during the holidays", " late at night",
)
_ENDINGS = (
    ".", ".", ".", "!", "?",
    " while the sun sets.", " because the weather is nice.", ", although nobody is watching.",
    " and then goes home.", ", as they do every week.",
)
_HEADLINES = (
    "Stocks fell sharply after the announcement", "The senate passed the budget late on Tuesday",
    "Heavy snow closed the airport for two days", "The city opened a new library downtown",
    "Scientists found water ice near the moon's south pole", "The local team won the championship",
    "Fuel prices rose for the third month in a row", "A new vaccine was approved for children",
    "The museum returned the stolen painting", "Researchers linked sleep loss to memory problems",
)
_QUESTIONS = (
    "how do I reset my password", "where can I buy a cheap train ticket", "what time does the pharmacy close",
    "is it safe to drink tap water here", "how many calories are in an apple", "best way to learn a new language",
    "why is the sky blue", "what is the capital of Australia", "how long should I boil an egg",
    "can dogs eat grapes",
)


def ordinary_sentences(n: int = 500, *, seed: int = 0) -> list[str]:
    """``n`` distinct everyday sentences: descriptions, headlines and search queries, in a seeded order.

    >>> len(ordinary_sentences(50)), len(set(ordinary_sentences(50)))
    (50, 50)
    """
    rng = random.Random(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        kind = rng.random()
        if kind < 0.7:
            text = rng.choice(_SUBJECTS) + " " + rng.choice(_ACTIONS) + rng.choice(_PLACES) + rng.choice(_ENDINGS)
        elif kind < 0.85:
            text = rng.choice(_HEADLINES) + rng.choice((".", ", officials said.", " on Monday.", ", reports say."))
        else:
            text = rng.choice(_QUESTIONS) + rng.choice(("", "?", " in winter", " quickly", " for beginners"))
        out[text] = None
    return list(out)
