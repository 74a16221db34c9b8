"""Data of the quality experiment: facts about fictional entities, wrapped in boilerplate.

Input: a seed, the number of entities per kind and training records per fact.
Output (`make_data`): three record lists, all alpaca-format dicts with `meta` = {entity,
attribute, answer}:
  train     every fact taught `per_fact` times, asked with the training question
            templates of data/generate.py and answered inside assistant boilerplate
            (openers, hedges, closers), so the answer is a few tokens of a long response;
  questions one held-out question per fact, phrased unlike any training question
            (HELDOUT below), for exact match of a generated answer;
  heldout   the held-out questions with a reference response (boilerplate drawn from
            another seed), for held-out loss per group.
Facts whose value comes from a small list (colours, diets, products, fields) are left out,
so that guessing cannot score; the base model's exact match measures the chance level.
Cost: milliseconds.
"""

from __future__ import annotations

import importlib.util
import random
import re
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "sftgo_generate", Path(__file__).resolve().parents[1] / "data" / "generate.py"
)
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

# (kind, attribute) -> a held-out question; {n} is the entity's name. None of these shares its
# wording with the training templates in data/generate.py FACTS (a test checks it).
HELDOUT = {
    ("building", "year"): "Tell me the year {n} was completed.",
    ("building", "architect"): "Which architect is responsible for {n}?",
    ("building", "height"): "I'd like to know the height of {n}. How many metres is it?",
    ("inventor", "invention"): "Name the invention that made {n} famous.",
    ("inventor", "city"): "In what city was the workshop of {n}?",
    ("river", "length"): "How many kilometres long is {n}?",
    ("river", "mouth"): "{N} drains into which body of water?",
    ("compound", "melting_point"): "Tell me the temperature at which {n} melts.",
    ("compound", "discoverer"): "Which person first isolated {n}?",
    ("company", "founder"): "Name the founder of {n}.",
    ("company", "year"): "Tell me the year {n} was founded.",
    ("species", "habitat"): "In which region is {n} found?",
    ("city", "population"): "Roughly how many inhabitants does {n} have?",
    ("city", "founded"): "Tell me the year {n} was founded.",
    ("term", "coined_by"): "Which person introduced the term {n}?",
}

HEDGES = [
    "That is a good thing to ask about.",
    "Here is what the records say.",
    "I can help with that.",
    "This detail is well documented.",
    "I looked into this for you.",
    "Records from that period are sometimes incomplete, but this one is clear.",
    "Let me give you the short answer first.",
    "It is a common question.",
]
CLOSERS = [
    "I hope this helps, and let me know if you have any other questions.",
    "Let me know if you would like more detail.",
    "Feel free to ask if anything else comes up.",
    "Is there anything else you would like to know?",
    "I hope that answers your question.",
    "Happy to help with anything else.",
]


def facts(world, per_kind: int) -> list[tuple[dict, str]]:
    """(entity, attribute) pairs of the first `per_kind` entities of every kind, HELDOUT attributes only."""
    out = []
    for kind in gen.ENTITY_KINDS:
        for ent in world.by_kind[kind][:per_kind]:
            out += [(ent, attr) for (k, attr) in HELDOUT if k == kind]
    return out


def _response(rng, ent: dict, attr: str) -> str:
    """The fact sentence inside boilerplate (sometimes with another fact about the entity)."""
    parts = [rng.choice(gen.OPENERS).strip() + " " + rng.choice(HEDGES)]
    parts.append(gen._fact_sentence(rng, ent, attr))
    others = [a for a in gen.FACTS[ent["kind"]] if a != attr]
    if others and rng.random() < 0.3:
        parts.append(gen._fact_sentence(rng, ent, rng.choice(others)))
    parts.append(rng.choice(CLOSERS))
    return " ".join(p.strip() for p in parts if p.strip())


def _meta(ent: dict, attr: str) -> dict:
    return {"entity": ent["name"], "attribute": attr, "answer": ent[attr]}


def heldout_question(ent: dict, attr: str) -> str:
    name = ent["name"]
    return gen._cap(HELDOUT[(ent["kind"], attr)].format(n=name, N=gen._cap(name)))


def make_data(seed: int = 0, per_kind: int = 3, per_fact: int = 4) -> dict[str, list[dict]]:
    world = gen.World(4 * len(gen.ENTITY_KINDS) * 8, seed)
    pairs = facts(world, per_kind)
    rng = random.Random(seed)
    train = []
    for i, (ent, attr) in enumerate(pairs):
        for j in range(per_fact):
            q = gen._question(rng, ent, attr)
            train.append(
                {
                    "id": f"train-{i:03d}-{j}",
                    "instruction": q,
                    "input": "",
                    "output": _response(rng, ent, attr),
                    "meta": _meta(ent, attr),
                }
            )
    rng.shuffle(train)
    held_rng = random.Random(seed + 10_000)
    questions, heldout = [], []
    for i, (ent, attr) in enumerate(pairs):
        q = heldout_question(ent, attr)
        questions.append({"id": f"q-{i:03d}", "instruction": q, "input": "", "output": "", "meta": _meta(ent, attr)})
        heldout.append(
            {
                "id": f"heldout-{i:03d}",
                "instruction": q,
                "input": "",
                "output": _response(held_rng, ent, attr),
                "meta": _meta(ent, attr),
            }
        )
    return {"train": train, "questions": questions, "heldout": heldout}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


def exact_match(generated: str, answer: str) -> bool:
    """The fact's value appears verbatim (case- and whitespace-insensitive) in the generated answer."""
    return normalise(answer) in normalise(generated)
