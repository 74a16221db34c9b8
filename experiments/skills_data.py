"""Skill tasks for the fair SFT-GO experiment (set-up: experiments/skills_analysis.md): the important tokens of
each answer are computed from the input, so the paper's premise can hold and be measured.

Input: a seed (it sets the generated world: names, places, numbers) and sizes.
Output: `make_split(seed, n, heldout)` -> alpaca records {"id", "instruction", "input", "output",
"meta": {"task", "answer"}} of four tasks:
  arithmetic      add two numbers; the answer is their sum;
  transformation  write a word backwards; the answer is the reversed word;
  extraction      read a generated passage, give one attribute; the answer is the attribute;
  summarization   one sentence of a generated match report; the answer is winner, score and place.
`meta.answer` is a substring of `output` (the oracle's important tokens and the exact-match
target).  Held-out records (heldout=True) use instruction phrasings no training record uses, and
are drawn from other syllables (new names, towns and words by construction) and should use another
seed, so that the numbers are new too.
Cost: microseconds per record.
"""

from __future__ import annotations

import random

# held-out records are built from other syllables: their names, towns and words are new by construction
_SYLLABLES = {
    False: ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "ul", "pe", "gar", "nio", "ze", "bru"],
    True: ["bo", "ef", "qui", "har", "ol", "tem", "wy", "fin", "ju", "cre", "os", "yel", "pra", "dun", "ix", "mau"],
}
_JOBS = ["baker", "pilot", "surveyor", "glassblower", "archivist", "ferryman", "cartographer", "beekeeper"]

TEMPLATES = {  # (training phrasings, held-out phrasings)
    "arithmetic": (["What is {a} plus {b}?", "Add {a} and {b}."], ["Compute the sum of {a} and {b}."]),
    "transformation": (
        ["Write the word '{w}' backwards.", "Reverse the letters of '{w}'."],
        ["Spell '{w}' from its last letter to its first."],
    ),
    "extraction": (["Where was {name} born?", "In which town was {name} born?"], ["Name the birthplace of {name}."]),
    "summarization": (
        ["Summarize the match report in one sentence.", "Give a one-sentence summary of the report."],
        ["Condense the report into a single sentence."],
    ),
}


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYLLABLES[rng.heldout]) for _ in range(parts)).capitalize()


def _arithmetic(rng, phrasing):
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    answer = str(a + b)
    return phrasing.format(a=a, b=b), "", f"Adding {a} and {b} gives {answer}.", answer


def _transformation(rng, phrasing):
    word = _name(rng, 3).lower()
    answer = word[::-1]
    return phrasing.format(w=word), "", f"Written backwards, '{word}' is '{answer}'.", answer


def _extraction(rng, phrasing):
    name, town, other = _name(rng), _name(rng, 3), _name(rng, 3)
    job, year = rng.choice(_JOBS), rng.randint(1900, 2000)
    passage = f"{name} was born in {town} in {year}. Later {name} moved to {other} and worked as a {job}."
    return phrasing.format(name=name), passage, f"{name} was born in {town}.", town


def _summarization(rng, phrasing):
    home, away, town = _name(rng), _name(rng), _name(rng, 3)
    s1, s2 = rng.randint(2, 6), rng.randint(0, 1)
    report = (
        f"The {home} Rovers hosted the {away} United in {town}. The crowd was large. "
        f"The Rovers scored {s1} times and United {s2}."
    )
    answer = f"the {home} Rovers beat the {away} United {s1}-{s2} in {town}"
    return phrasing, report, f"In short, {answer}.", answer


_TASKS = {
    "arithmetic": _arithmetic,
    "transformation": _transformation,
    "extraction": _extraction,
    "summarization": _summarization,
}


def make_split(seed: int, n: int, heldout: bool = False) -> list[dict]:
    """`n` records, the four tasks in turn; held-out ones phrased as no training record is."""
    rng = random.Random(seed)
    rng.heldout = heldout  # which syllables _name draws from
    records = []
    for i in range(n):
        task = list(_TASKS)[i % len(_TASKS)]
        phrasing = rng.choice(TEMPLATES[task][1 if heldout else 0])
        instruction, passage, output, answer = _TASKS[task](rng, phrasing)
        records.append(
            {
                "id": f"{'heldout' if heldout else 'train'}-{seed}-{i}",
                "instruction": instruction,
                "input": passage,
                "output": output,
                "meta": {"task": task, "answer": answer},
            }
        )
    return records
