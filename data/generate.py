#!/usr/bin/env python3
"""Generate synthetic instruction data about a fictional world (stdlib only).

Input: a record count, a seed and a kind ("alpaca" or "chat").
Output: records whose responses mix content tokens (fictional names, numbers, dates,
places, technical terms) with assistant boilerplate ("Sure! Here is ...", "I hope this
helps."). Every record carries meta = {"task", "entity", "attribute", "answer"}: the
fact it teaches, so a quality experiment can ask for it later. Facts are consistent:
the world (buildings, inventors, rivers, compounds, companies, species, cities,
technical terms) is drawn once from the seed and every record about an entity repeats
the same facts. Alpaca and chat records made with the same seed and count share a world.
Cost: about 10 us per record (well over 50k records/s on one core); the world is sized
with the record count (about one entity per four records).

    python data/generate.py --out data/ --records 300 --seed 0 [--format alpaca|chat|both]

From Python (benchmarks): `from data.generate import generate, write_jsonl`, or load
this file with importlib.
"""

from __future__ import annotations

import argparse
import json
import os
import random

KINDS = ("alpaca", "chat")

# ---------------------------------------------------------------------------------
# Vocabulary. Names are composed from syllables, so they are fictional by construction.
# ---------------------------------------------------------------------------------
FIRST_A = [
    "Id",
    "Per",
    "Mar",
    "Thes",
    "Ol",
    "Ben",
    "Ca",
    "Ro",
    "Si",
    "Al",
    "Ev",
    "Dor",
    "Lu",
    "Ni",
    "Ta",
    "Wen",
    "Fa",
    "Gre",
    "Ha",
    "Jo",
    "Mei",
    "Ra",
    "Ys",
    "Ko",
]
FIRST_B = ["ris", "a", "en", "ton", "ie", "wyn", "o", "ia", "an", "el", "ard", "ina", "ek", "isa"]
LAST_A = [
    "Pel",
    "Mar",
    "Thorn",
    "Ash",
    "Quil",
    "Brenn",
    "Cald",
    "Dun",
    "Fen",
    "Hal",
    "Kes",
    "Lor",
    "Mor",
    "Orr",
    "Rav",
    "Tam",
    "Vel",
    "Wick",
    "Sar",
    "Gant",
    "Ober",
    "Lind",
]
LAST_B = ["low", "dene", "ford", "wick", "sby", "more", "ton", "ridge", "ell", "ane", "ish", "ock", "vard", "hurst"]
PLACE_A = [
    "Quel",
    "Var",
    "Ost",
    "Bel",
    "Cor",
    "Dra",
    "Elm",
    "Fal",
    "Gal",
    "Hesk",
    "Ith",
    "Jor",
    "Kal",
    "Lun",
    "Mir",
    "Nor",
    "Pra",
    "Ryn",
    "Sol",
    "Tav",
    "Ul",
    "Wes",
    "Yar",
    "Zem",
]
PLACE_B = ["mora", "heim", "avia", "ford", "port", "dell", "wyn", "ara", "ost", "grad", "mere", "ton", "ia", "vale"]
WORDS = [
    "Varnish",
    "Copper",
    "Lantern",
    "Harbour",
    "Saffron",
    "Iron",
    "Willow",
    "Granite",
    "Amber",
    "Cobalt",
    "Meridian",
    "Thistle",
    "Juniper",
    "Falcon",
    "Silver",
    "Oriel",
    "Beacon",
    "Tidewater",
    "Marrow",
    "Ember",
    "Quarry",
    "Lattice",
    "Crescent",
    "Bramble",
]
BUILDING_TYPES = [
    "Tower",
    "Bridge",
    "Library",
    "Observatory",
    "Hall",
    "Lighthouse",
    "Conservatory",
    "Aqueduct",
    "Theatre",
    "Clocktower",
]
DEVICE_A = [
    "thermal",
    "harmonic",
    "pneumatic",
    "optical",
    "magnetic",
    "tidal",
    "acoustic",
    "rotary",
    "spectral",
    "ballast",
    "gyroscopic",
    "capillary",
]
DEVICE_B = [
    "loom",
    "regulator",
    "sextant",
    "valve",
    "resonator",
    "press",
    "compass",
    "lamp",
    "pump",
    "telegraph",
    "balance",
    "kiln",
]
COMPOUND_A = [
    "Vor",
    "Thal",
    "Kry",
    "Osm",
    "Pel",
    "Zir",
    "Mol",
    "Quen",
    "Bra",
    "Lis",
    "Ner",
    "Cas",
    "Dro",
    "Fel",
    "Hyd",
    "Ister",
]
COMPOUND_B = ["an", "o", "ex", "ar", "il", "em", "un"]
COMPOUND_C = ["ium", "ite", "ene", "ol", "ane", "ate"]
COLOURS = [
    "pale green",
    "deep violet",
    "amber",
    "silvery grey",
    "rust red",
    "cobalt blue",
    "milky white",
    "jet black",
    "pale yellow",
]
COMPANY_B = ["Works", "Instruments", "Laboratories", "Foundry", "Optics", "Mills", "Engineering", "Textiles"]
PRODUCTS = [
    "precision clocks",
    "glass lenses",
    "river barges",
    "signal lamps",
    "weather instruments",
    "printing presses",
    "steel cable",
    "dyes",
    "ceramic tiles",
    "bicycles",
    "telescopes",
    "water filters",
]
ANIMAL_A = ["crested", "spotted", "lesser", "river", "ash", "dusky", "golden", "banded", "long-tailed", "horned"]
ANIMAL_B = [
    "marrowfinch",
    "quillhare",
    "fenmoth",
    "tarnowl",
    "brackvole",
    "cindertoad",
    "saltheron",
    "reedlynx",
    "mossgoat",
    "duneskink",
]
DIETS = ["seeds", "insects", "river fish", "mosses", "berries", "small rodents", "reeds", "lichen"]
HABITATS = ["marshes", "pine forests", "chalk hills", "salt flats", "river valleys", "high meadows", "coastal cliffs"]
TERM_A = [
    "quorum",
    "phase-drift",
    "ledger",
    "spindle",
    "cascade",
    "shadow",
    "tessellated",
    "backpressure",
    "half-open",
    "lattice",
    "ripple",
    "staggered",
]
TERM_B = [
    "buffer",
    "index",
    "protocol",
    "scheduler",
    "transform",
    "checksum",
    "cache",
    "handshake",
    "queue",
    "encoding",
    "filter",
    "allocator",
]
FIELDS = [
    "distributed databases",
    "signal processing",
    "compiler design",
    "network routing",
    "storage engines",
    "numerical simulation",
    "cryptography",
    "operating systems",
]
PURPOSES = [
    "keep replicas consistent after a network split",
    "reduce the latency of small writes",
    "detect corrupted blocks before they are read",
    "spread load evenly across workers",
    "recover quickly after a crash",
    "avoid recomputing expensive intermediate results",
    "bound the memory used by long-running jobs",
    "order events that arrive out of sequence",
]
FRUITS = ["apples", "pears", "plums", "quinces", "apricots", "figs", "lemons"]
ITEMS = ["notebooks", "lanterns", "tickets", "bolts of cloth", "jars of honey", "maps", "pencils", "candles"]
CURRENCY = ["crowns", "marks", "florins", "shillings"]

OPENERS = [
    "Sure! ",
    "Of course. ",
    "Certainly! ",
    "Great question! ",
    "Happy to help. ",
    "Absolutely. ",
    "",
    "",
    "",
    "",
]
HERE_IS = [
    "Sure! Here is {x}:",
    "Of course! Here is {x}:",
    "Certainly. Here is {x}:",
    "Here is {x}:",
    "Happy to help! Below is {x}:",
]
CLOSERS = [
    " I hope this helps.",
    " Let me know if you have other questions.",
    " I hope this helps! Let me know if you have any other questions.",
    " Feel free to ask if you would like more detail.",
    " Is there anything else you would like to know?",
    "",
    "",
    "",
]
SYSTEMS = [
    "You are a helpful assistant.",
    "You are a helpful, concise assistant.",
    "You are a knowledgeable guide to the history and geography of the Northern Reaches.",
    "You are Atlas, an assistant for the {place} city archive. Answer accurately and briefly.",
    "You are a patient tutor. Explain your reasoning step by step.",
    "You are an expert technical writer. Prefer clear, plain language.",
]
THANKS = ["Thanks, that helps!", "Great, thank you.", "Perfect, thanks!", "Thank you!"]
WELCOME = [
    "You're welcome! Let me know if you have other questions.",
    "Glad I could help. Let me know if there is anything else you need.",
    "You're welcome! Happy to help with anything else.",
    "Anytime! Feel free to ask if something else comes up.",
]
GENERIC_SENTENCES = [
    "In practice, it is most useful when the workload is large and changes often.",
    "Many engineers first meet it while debugging a system that behaves well in tests but poorly in production.",
    "It is simple to describe, but getting the details right takes some care.",
    "A small example usually makes the idea much clearer than a formal definition.",
    "The main trade-off is between speed and the amount of memory it needs.",
    "Most modern implementations follow the same basic design, with minor variations.",
    "It works best when combined with good monitoring, so that problems are noticed early.",
    "Beginners often overlook the edge cases, such as empty inputs or very large values.",
    "The idea has been refined many times since it was first described.",
    "It is worth measuring before and after adopting it, because the benefit depends on the workload.",
]


def _person(rng) -> str:
    c = rng.choice
    return f"{c(FIRST_A)}{c(FIRST_B)} {c(LAST_A)}{c(LAST_B)}"


def _place(rng) -> str:
    return rng.choice(PLACE_A) + rng.choice(PLACE_B)


def _ordinal_year(rng, lo=1720, hi=1960) -> int:
    return rng.randint(lo, hi)


# ---------------------------------------------------------------------------------
# The world: entities with fixed facts. Each entity is a dict with "kind", "name" and
# its attributes; FACTS says, per kind, how to ask for and state each attribute.
# ---------------------------------------------------------------------------------
def _make_entity(kind: str, rng) -> dict:
    c = rng.choice
    if kind == "building":
        city = _place(rng)
        return {
            "kind": kind,
            "name": f"the {c(WORDS)} {c(BUILDING_TYPES)} in {city}",
            "city": city,
            "year": str(_ordinal_year(rng, 1780, 1950)),
            "architect": _person(rng),
            "height": f"{rng.randint(12, 180)} metres",
        }
    if kind == "inventor":
        return {
            "kind": kind,
            "name": _person(rng),
            "invention": f"the {c(DEVICE_A)} {c(DEVICE_B)}",
            "year": str(_ordinal_year(rng)),
            "city": _place(rng),
        }
    if kind == "river":
        return {
            "kind": kind,
            "name": f"the {_place(rng)} River",
            "length": f"{rng.randint(40, 2900)} kilometres",
            "mouth": f"the {_place(rng)} Sea" if rng.random() < 0.5 else f"Lake {_place(rng)}",
            "source": f"the {c(['northern', 'eastern', 'western', 'southern'])} slopes of Mount {_place(rng)}",
        }
    if kind == "compound":
        return {
            "kind": kind,
            "name": c(COMPOUND_A) + c(COMPOUND_B) + c(COMPOUND_C),
            "melting_point": f"{rng.randint(-80, 2400)} degrees Celsius",
            "discoverer": _person(rng),
            "colour": c(COLOURS),
            "year": str(_ordinal_year(rng, 1760, 1990)),
        }
    if kind == "company":
        return {
            "kind": kind,
            "name": f"{c(WORDS)} {c(COMPANY_B)}",
            "founder": _person(rng),
            "year": str(_ordinal_year(rng, 1800, 1990)),
            "city": _place(rng),
            "product": c(PRODUCTS),
        }
    if kind == "species":
        return {
            "kind": kind,
            "name": f"the {c(ANIMAL_A)} {c(ANIMAL_B)}",
            "habitat": f"the {c(HABITATS)} of {_place(rng)}",
            "weight": f"{rng.randint(1, 400) / 10:g} kilograms",
            "diet": c(DIETS),
        }
    if kind == "city":
        k = rng.randint(3, 7)
        districts = []
        while len(districts) < k:
            d = f"{c(WORDS)} {c(['Quarter', 'Row', 'Heights', 'Market', 'Docks', 'Gate', 'Green'])}"
            if d not in districts:
                districts.append(d)
        return {
            "kind": kind,
            "name": _place(rng),
            "population": f"{rng.randint(2, 900) * 1000 + rng.randint(0, 999):,}",
            "founded": str(rng.randint(900, 1700)),
            "districts": districts,
        }
    # technical term
    return {
        "kind": "term",
        "name": f"{c(TERM_A)} {c(TERM_B)}",
        "field": c(FIELDS),
        "purpose": c(PURPOSES),
        "coined_by": _person(rng),
        "year": str(rng.randint(1962, 2019)),
    }


ENTITY_KINDS = ("building", "inventor", "river", "compound", "company", "species", "city", "term")

# kind -> attribute -> (question templates, answer-sentence templates); {n} is the entity
# name (capitalised where it starts a sentence by _cap), {v} the attribute's value.
FACTS = {
    "building": {
        "year": (
            ["When was {n} completed?", "In what year was {n} finished?", "What year was {n} built?"],
            ["{N} was completed in {v}.", "Construction of {n} finished in {v}."],
        ),
        "architect": (
            ["Who designed {n}?", "Who was the architect of {n}?"],
            ["{N} was designed by the architect {v}.", "The architect of {n} was {v}."],
        ),
        "height": (
            ["How tall is {n}?", "What is the height of {n}?"],
            ["{N} is {v} tall.", "{N} rises {v} above the street."],
        ),
    },
    "inventor": {
        "invention": (
            ["What did {n} invent?", "What is {n} best known for inventing?"],
            ["{N} invented {v}.", "{N} is best known as the inventor of {v}."],
        ),
        "year": (
            ["In what year did {n} present their most famous invention?"],
            ["{N} presented {invention} in {v}.", "{N} first showed {invention} in {v}."],
        ),
        "city": (
            ["Where did {n} work?", "In which city did {n} build their workshop?"],
            ["{N} worked in {v}.", "{N} kept a workshop in {v} for most of their career."],
        ),
    },
    "river": {
        "length": (["How long is {n}?", "What is the length of {n}?"], ["{N} is {v} long.", "{N} runs for {v}."]),
        "mouth": (
            ["Where does {n} end?", "Into what body of water does {n} flow?"],
            ["{N} flows into {v}.", "{N} empties into {v}."],
        ),
        "source": (
            ["Where does {n} begin?", "What is the source of {n}?"],
            ["{N} rises on {v}.", "The source of {n} lies on {v}."],
        ),
    },
    "compound": {
        "melting_point": (
            ["What is the melting point of {n}?", "At what temperature does {n} melt?"],
            ["{N} melts at {v}.", "The melting point of {n} is {v}."],
        ),
        "discoverer": (
            ["Who discovered {n}?", "Who first isolated {n}?"],
            ["{N} was first isolated by {v}.", "{v} discovered {n}."],
        ),
        "colour": (
            ["What colour is {n}?", "What does {n} look like?"],
            ["Pure {n} is {v}.", "{N} forms {v} crystals."],
        ),
    },
    "company": {
        "founder": (["Who founded {n}?", "Who started {n}?"], ["{N} was founded by {v}.", "{v} started {n}."]),
        "year": (
            ["When was {n} founded?", "In what year was {n} established?"],
            ["{N} was founded in {v}.", "{N} opened its doors in {v}."],
        ),
        "product": (
            ["What does {n} make?", "What is {n} known for producing?"],
            ["{N} makes {v}.", "{N} is known for its {v}."],
        ),
    },
    "species": {
        "habitat": (
            ["Where does {n} live?", "What is the habitat of {n}?"],
            ["{N} lives in {v}.", "{N} is found mainly in {v}."],
        ),
        "weight": (
            ["How much does {n} weigh?", "What does an adult {x} weigh?"],
            ["An adult {x} weighs about {v}.", "{N} weighs around {v}."],
        ),
        "diet": (
            ["What does {n} eat?", "What is the diet of {n}?"],
            ["{N} feeds mostly on {v}.", "The diet of {n} consists mainly of {v}."],
        ),
    },
    "city": {
        "population": (
            ["What is the population of {n}?", "How many people live in {n}?"],
            ["{N} has a population of {v}.", "About {v} people live in {n}."],
        ),
        "founded": (
            ["When was {n} founded?", "In what year was {n} founded?"],
            ["{N} was founded in {v}.", "The city of {n} dates back to {v}."],
        ),
    },
    "term": {
        "coined_by": (
            ["Who coined the term {n}?", "Who introduced the {n}?"],
            ["The term was coined by {v}.", "The {n} was introduced by {v}."],
        ),
        "field": (["In what field is the {n} used?"], ["The {n} is used in {v}.", "The {n} comes from {v}."]),
    },
}


_COMMON_FIRST = {"The", "An", "About", "Pure", "Construction", "It"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fact_sentence(rng, ent: dict, attr: str) -> str:
    name = ent["name"]
    tmpl = rng.choice(FACTS[ent["kind"]][attr][1])
    bare = name[4:] if name.startswith("the ") else name
    return _cap(tmpl.format(n=name, N=_cap(name), v=ent[attr], x=bare, invention=ent.get("invention")))


def _question(rng, ent: dict, attr: str) -> str:
    name = ent["name"]
    bare = name[4:] if name.startswith("the ") else name
    return rng.choice(FACTS[ent["kind"]][attr][0]).format(n=name, x=bare)


class World:
    """Entities by kind, drawn once from the seed; about one entity per four records."""

    def __init__(self, n_records: int, seed: int):
        rng = random.Random(seed)
        per_kind = min(max(8, n_records // (4 * len(ENTITY_KINDS))), 4000)
        self.by_kind: dict[str, list[dict]] = {}
        for kind in ENTITY_KINDS:
            seen, ents, misses = set(), [], 0
            while len(ents) < per_kind and misses < 50:  # small name spaces saturate: stop, never repeat a name
                e = _make_entity(kind, rng)
                if e["name"] in seen:
                    misses += 1
                    continue
                seen.add(e["name"])
                ents.append(e)
            self.by_kind[kind] = ents
        self.by_name = {e["name"]: e for ents in self.by_kind.values() for e in ents}
        self.fact_kinds = [k for k in ENTITY_KINDS if k != "city"]


# ---------------------------------------------------------------------------------
# Tasks. Each returns (instruction, input, output, meta); `input` is "" when unused.
# ---------------------------------------------------------------------------------
def _closer(rng) -> str:
    return rng.choice(CLOSERS)


def task_fact_qa(rng, world: World):
    kind = rng.choice(world.fact_kinds + ["city"])
    ent = rng.choice(world.by_kind[kind])
    attr = rng.choice(list(FACTS[kind]))
    question = _question(rng, ent, attr)
    answer = _fact_sentence(rng, ent, attr)
    inp = ""
    r = rng.random()
    if r < 0.2:
        # Reading comprehension: the facts are given in the input passage.
        others = [a for a in FACTS[kind] if a != attr]
        passage = " ".join([_fact_sentence(rng, ent, a) for a in others] + [answer])
        inp, question = passage, "Answer the question using the passage below. " + question
        first = answer.split(" ", 1)[0]
        lead = answer[0].lower() + answer[1:] if first in _COMMON_FIRST else answer  # keep names capitalised
        out = f"According to the passage, {lead}"
    elif r < 0.55:
        out = answer  # short answer
    else:
        extra = [a for a in FACTS[kind] if a != attr]
        more = " ".join(_fact_sentence(rng, ent, a) for a in extra[: rng.randint(1, len(extra))])
        out = f"{rng.choice(OPENERS)}{answer} {more}{_closer(rng)}"
    return question, inp, out, {"task": "fact_qa", "entity": ent["name"], "attribute": attr, "answer": ent[attr]}


def task_explain(rng, world: World):
    ent = rng.choice(world.by_kind["term"])
    n = ent["name"]
    q = rng.choice(
        [
            f"Explain what a {n} is.",
            f"What is a {n}, and why would I use one?",
            f"Can you give me a short explanation of the {n}?",
            f"I keep hearing about the {n} in {ent['field']}. What is it?",
        ]
    )
    parts = [
        rng.choice(OPENERS) + f"A {n} is a technique from {ent['field']} used to {ent['purpose']}.",
        f"The term was coined by {ent['coined_by']} in {ent['year']}.",
    ]
    depth = rng.random()
    generic = rng.sample(GENERIC_SENTENCES, len(GENERIC_SENTENCES))  # drawn without repeats below
    if depth > 0.3:
        a, b = rng.randint(2, 9), rng.randint(10, 64)
        parts.append(
            f"The core idea is to split the work into {a} stages and to keep a small "
            f"window of {b} pending items, so that no single stage can fall far behind."
        )
        parts.append(generic[0])
    if depth > 0.6:
        other = rng.choice(world.by_kind["term"])
        parts.append(
            f"\n\nHow it compares: unlike a {other['name']}, which is used to "
            f"{other['purpose']}, a {n} focuses on its own narrower goal."
        )
        parts.extend(generic[1 : rng.randint(3, 5)])
    if depth > 0.8:
        steps = rng.randint(3, 6)
        parts.append(
            f"\n\nA typical setup has {steps} steps:\n"
            + "\n".join(
                f"{i}. {s}"
                for i, s in enumerate(
                    _ordered_sample(
                        rng,
                        [
                            "Measure the current behaviour under a realistic load.",
                            f"Choose a window size; {ent['coined_by']} suggested starting with 16.",
                            "Enable it on one node and compare the error rates.",
                            "Roll it out gradually to the remaining nodes.",
                            "Keep the old path available so you can switch back.",
                            "Document the settings you chose and why.",
                            "Review the results after a week of traffic.",
                        ],
                        steps,
                    ),
                    1,
                )
            )
        )
        parts.append("\n\n" + " ".join(generic[5 : rng.randint(8, 10)]))
        parts.append(f"\n\nIn short, a {n} helps you {ent['purpose']}.")
    out = " ".join(parts).replace(" \n", "\n") + _closer(rng)
    return q, "", out, {"task": "explain", "entity": n, "attribute": "coined_by", "answer": ent["coined_by"]}


def task_list(rng, world: World):
    if rng.random() < 0.5:
        ent = rng.choice(world.by_kind["city"])
        items = ent["districts"]
        q = rng.choice(
            [
                f"List the districts of {ent['name']}.",
                f"What are the districts of {ent['name']}?",
                f"Name every district of {ent['name']}.",
            ]
        )
        head = rng.choice(HERE_IS).format(x=f"the list of the {len(items)} districts of {ent['name']}")
        body = "\n".join(f"{i}. {d}" for i, d in enumerate(items, 1))
        meta = {
            "task": "list",
            "entity": ent["name"],
            "attribute": "districts",
            "answer": items[0],
            "items": list(items),
        }
    else:
        kind = rng.choice(world.fact_kinds)
        ent = rng.choice(world.by_kind[kind])
        attrs = list(FACTS[kind])
        q = rng.choice(
            [
                f"Give me {len(attrs)} key facts about {{}}.",
                "List some facts about {}.",
                "Summarise what is known about {} as a bulleted list.",
            ]
        )
        shown = "the " + ent["name"] if kind == "term" else ent["name"]
        q = q.format(shown)
        head = rng.choice(HERE_IS).replace(" is ", " are ", 1).format(x=f"a few key facts about {shown}")
        body = "\n".join("- " + _fact_sentence(rng, ent, a) for a in attrs)
        meta = {"task": "list", "entity": ent["name"], "attribute": attrs[0], "answer": ent[attrs[0]]}
    return q, "", f"{head}\n\n{body}\n\n{_closer(rng).strip()}".rstrip(), meta


def task_arithmetic(rng, world: World):
    person = _person(rng)
    first = person.split()[0]
    cur = rng.choice(CURRENCY)
    t = rng.randint(0, 3)
    if t == 0:
        a, p = rng.randint(2, 24), rng.randint(2, 40)
        pay = (a * p // 50 + 1) * 50
        ans = pay - a * p
        what = rng.choice(FRUITS)
        q = (
            f"{person} buys {a} crates of {what} at {p} {cur} per crate and pays with {pay} {cur}. "
            f"How much change does {first} get?"
        )
        steps = [f"The crates cost {a} x {p} = {a * p} {cur}.", f"The change is {pay} - {a * p} = {ans} {cur}."]
        attr = "change"
    elif t == 1:
        speed, hours = rng.randint(8, 90), rng.randint(2, 12)
        ans = speed * hours
        person = place = _place(rng)
        q = f"A barge leaves {place} and travels at {speed} kilometres per hour for {hours} hours. How far does it go?"
        steps = [f"Distance = speed x time = {speed} x {hours} = {ans} kilometres."]
        attr = "distance_km"
    elif t == 2:
        boxes, per, sold = rng.randint(3, 30), rng.randint(4, 25), rng.randint(1, 50)
        total = boxes * per
        sold = min(sold, total)
        ans = total - sold
        what = rng.choice(ITEMS)
        q = (
            f"{person} has {boxes} boxes with {per} {what} in each box, then sells {sold} of them. "
            f"How many {what} are left?"
        )
        steps = [f"Start with {boxes} x {per} = {total} {what}.", f"After selling {sold}: {total} - {sold} = {ans}."]
        attr = "remaining"
    else:
        w, h, cost = rng.randint(3, 40), rng.randint(3, 40), rng.randint(2, 15)
        area = w * h
        ans = area * cost
        person = _place(rng)
        q = (
            f"A courtyard in {person} is {w} metres by {h} metres. Paving costs {cost} {cur} "
            f"per square metre. What does paving the whole courtyard cost?"
        )
        steps = [f"The area is {w} x {h} = {area} square metres.", f"The cost is {area} x {cost} = {ans} {cur}."]
        attr = "cost"
    style = rng.random()
    if style < 0.15:
        out = f"The answer is {ans}."
    else:
        out = (
            rng.choice(["Let's work through it step by step.\n\n", "Sure! Step by step:\n\n", ""])
            + "\n".join(steps)
            + f"\n\nSo the answer is {ans}."
            + _closer(rng)
        )
    return q, "", out, {"task": "arithmetic", "entity": person, "attribute": attr, "answer": str(ans)}


# Fixed syllable substitution for the fictional language "Velari" (a deterministic cipher).
_VELARI_MAP = str.maketrans("aeioubcdfgklmnprstvw", "eiouaktvphgrnmbcsdfl")


def _velari(text: str) -> str:
    return text.lower().translate(_VELARI_MAP)


def task_rewrite(rng, world: World):
    kind = rng.choice(world.fact_kinds)
    ent = rng.choice(world.by_kind[kind])
    attr = rng.choice(list(FACTS[kind]))
    sentence = _fact_sentence(rng, ent, attr)
    r = rng.random()
    if r < 0.35:
        casual = (
            rng.choice(["so basically, ", "ok so ", "fun fact: ", "apparently "])
            + sentence[0].lower()
            + sentence[1:-1]
            + rng.choice([" lol", "!!", ", i think", ""])
        )
        q = rng.choice(["Rewrite the following sentence in a formal tone.", "Make this sentence sound more formal."])
        out = rng.choice(["Here is a more formal version:\n\n", "Certainly. A formal rewording:\n\n", ""]) + sentence
        return q, casual, out, {"task": "rewrite_formal", "entity": ent["name"], "attribute": attr, "answer": ent[attr]}
    if r < 0.7:
        q = "Translate the following sentence into Velari."
        translated = _velari(sentence)
        out = rng.choice(["Here is the sentence in Velari:\n\n", "In Velari, that is:\n\n", ""]) + translated
        return (
            q,
            sentence,
            out,
            {"task": "translate", "entity": ent["name"], "attribute": "velari", "answer": translated},
        )
    attrs = list(FACTS[kind])
    passage = " ".join(_fact_sentence(rng, ent, a) for a in attrs) + " " + " ".join(rng.sample(GENERIC_SENTENCES, 2))
    q = rng.choice(["Summarise the following passage in one sentence.", "Give a one-sentence summary of this text."])
    out = rng.choice(["Sure! ", "", "In one sentence: "]) + sentence
    return q, passage, out, {"task": "summarise", "entity": ent["name"], "attribute": attr, "answer": ent[attr]}


TASKS = (
    task_fact_qa,
    task_fact_qa,
    task_fact_qa,
    task_explain,
    task_explain,
    task_list,
    task_arithmetic,
    task_arithmetic,
    task_rewrite,
    task_rewrite,
)


def _ordered_sample(rng, items: list, k: int) -> list:
    """k of items, chosen at random, kept in their original order."""
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _follow_up(rng, world: World, meta: dict, last: bool):
    """A later user/assistant exchange: thanks, another fact about the same entity, or a fact
    about another entity."""
    if last and rng.random() < 0.3:  # thanks only ends a conversation
        return rng.choice(THANKS), rng.choice(WELCOME)
    ent = world.by_name.get(meta["entity"])
    attrs = [a for a in FACTS[ent["kind"]] if a != meta["attribute"]] if ent else []
    if not attrs or rng.random() < 0.3:
        ent = rng.choice(world.by_kind[rng.choice(world.fact_kinds)])
        attrs = list(FACTS[ent["kind"]])
    attr = rng.choice(attrs)
    q = rng.choice(["", "Another question: ", "Thanks. ", "One more thing. "]) + _question(rng, ent, attr)
    return q, rng.choice(["", "", "Sure. "]) + _fact_sentence(rng, ent, attr)


def generate(n: int, seed: int = 0, kind: str = "alpaca") -> list[dict]:
    """n records of `kind` ("alpaca" or "chat"), deterministic given (n, seed, kind)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    world = World(n, seed)
    rng = random.Random(seed * 7919 + KINDS.index(kind) + 1)
    tasks, out = TASKS, []
    prefix = "alp" if kind == "alpaca" else "chat"
    for i in range(n):
        instruction, inp, output, meta = rng.choice(tasks)(rng, world)
        rid = f"{prefix}-{seed}-{i:06d}"
        if kind == "alpaca":
            out.append({"id": rid, "instruction": instruction, "input": inp, "output": output, "meta": meta})
            continue
        msgs = []
        if rng.random() < 0.4:
            msgs.append({"role": "system", "content": rng.choice(SYSTEMS).replace("{place}", _place(rng))})
        msgs.append({"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction})
        msgs.append({"role": "assistant", "content": output})
        r = rng.random()
        if r < 0.35:  # multi-turn: 2 or 3 exchanges
            extra = 1 if r < 0.2 else 2
            for j in range(extra):
                u, a = _follow_up(rng, world, meta, j == extra - 1)
                msgs.append({"role": "user", "content": u})
                msgs.append({"role": "assistant", "content": a})
        out.append({"id": rid, "messages": msgs, "meta": meta})
    return out


def write_jsonl(records, path) -> None:
    """Write records one JSON object per line (UTF-8), atomically (temporary file, then rename)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="example: python data/generate.py --out data/ --records 300 --seed 0"
    )
    p.add_argument("--out", default="data", help="output directory (files alpaca.jsonl, chat.jsonl)")
    p.add_argument("--records", type=int, default=300, help="records per file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("alpaca", "chat", "both"), default="both")
    a = p.parse_args(argv)
    if a.records < 0:
        p.error("--records must be >= 0")
    os.makedirs(a.out, exist_ok=True)
    for kind in KINDS if a.format == "both" else (a.format,):
        path = os.path.join(a.out, f"{kind}.jsonl")
        write_jsonl(generate(a.records, a.seed, kind), path)
        print(f"wrote {a.records} {kind} records to {path}")


if __name__ == "__main__":
    main()
