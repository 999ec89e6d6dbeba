"""GSM-style word problems from templates: two to three arithmetic steps, whole answers.

A problem's identity is its template and numbers; names and objects are decoration, so
"Ava has 12 apples" and "Ben has 12 pears" with the same numbers are one problem and fall in
the same split.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from seekforge.tasks.base import Row, Task, check_int, final_line

_PEOPLE = [("Ava", "she", "her"), ("Ben", "he", "his"), ("Mia", "she", "her"), ("Liam", "he", "his"),
           ("Zoe", "she", "her"), ("Omar", "he", "his"), ("Lena", "she", "her"), ("Ravi", "he", "his"),
           ("Sofia", "she", "her"), ("Kenji", "he", "his")]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cards", "shells", "coins", "beads"]
_GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("book", "books"), ("cup", "cups"), ("ball", "balls")]
_VEHICLES = ["train", "bus", "boat", "truck", "cyclist"]
_RELATIVES = ["aunt", "uncle", "grandmother", "grandfather", "cousin"]

# A template returns (numbers, prompt, steps, answer) for numbers drawn up to `top`.
Template = Callable[[random.Random, int], tuple[tuple[int, ...], str, list[str], int]]


def _buy_then_give(rng: random.Random, top: int):
    (name, he, _), friend = rng.choice(_PEOPLE), rng.choice(_PEOPLE)[0]
    item = rng.choice(_ITEMS)
    a, packs, each = rng.randint(1, top), rng.randint(2, 9), rng.randint(2, top)
    give = rng.randint(1, a + packs * each)
    prompt = (f"{name} has {a} {item}. {he.capitalize()} buys {packs} packs with {each} {item} in each pack, "
              f"then gives {give} {item} to {friend}. How many {item} does {name} have now?")
    bought, total = packs * each, a + packs * each
    steps = [f"The packs hold {packs} * {each} = {bought} {item}.", f"{name} then has {a} + {bought} = {total}.",
             f"After giving {give} away: {total} - {give} = {total - give}."]
    return (a, packs, each, give), prompt, steps, total - give


def _shopping(rng: random.Random, top: int):
    name = rng.choice(_PEOPLE)[0]
    (one, ones), (two, twos) = rng.sample(_GOODS, 2)
    p, q, m, k = rng.randint(1, top), rng.randint(1, top), rng.randint(2, 9), rng.randint(2, 9)
    prompt = (f"A {one} costs ${p} and a {two} costs ${q}. {name} buys {m} {ones} and {k} {twos}. "
              f"How many dollars does {name} spend?")
    steps = [f"The {ones} cost {m} * {p} = {m * p} dollars.", f"The {twos} cost {k} * {q} = {k * q} dollars.",
             f"Together: {m * p} + {k * q} = {m * p + k * q}."]
    return (p, q, m, k), prompt, steps, m * p + k * q


def _change(rng: random.Random, top: int):
    name, he, _ = rng.choice(_PEOPLE)
    one, ones = rng.choice(_GOODS)
    m, p = rng.randint(2, 9), rng.randint(1, top)
    money = m * p + rng.randint(0, 5 * top)
    prompt = (f"{name} has ${money}. {he.capitalize()} buys {m} {ones} at ${p} each. "
              f"How many dollars does {he} have left?")
    steps = [f"The {ones} cost {m} * {p} = {m * p} dollars.", f"Left: {money} - {m * p} = {money - m * p}."]
    return (money, m, p), prompt, steps, money - m * p


def _share(rng: random.Random, top: int):
    name = rng.choice(_PEOPLE)[0]
    item = rng.choice(_ITEMS)
    friends, each, extra = rng.randint(2, 9), rng.randint(1, top), rng.randint(1, top)
    total = friends * each
    prompt = (f"{name} has {total} {item} and shares them equally among {friends} friends. "
              f"Each friend then finds {extra} more {item}. How many {item} does each friend have now?")
    steps = [f"Each friend gets {total} / {friends} = {each}.",
             f"With the ones found: {each} + {extra} = {each + extra}."]
    return (total, friends, extra), prompt, steps, each + extra


def _distance(rng: random.Random, top: int):
    vehicle = rng.choice(_VEHICLES)
    speed, hours, extra = rng.randint(2, 5 * top), rng.randint(2, 9), rng.randint(1, 5 * top)
    prompt = (f"A {vehicle} travels {speed} km every hour. It travels for {hours} hours, then {extra} more km. "
              "How many km does it travel in total?")
    steps = [f"In {hours} hours: {hours} * {speed} = {hours * speed} km.",
             f"With the rest: {hours * speed} + {extra} = {hours * speed + extra} km."]
    return (speed, hours, extra), prompt, steps, hours * speed + extra


def _age(rng: random.Random, top: int):
    name, _, his = rng.choice(_PEOPLE)
    relative = rng.choice(_RELATIVES)
    age, times, years = rng.randint(2, top), rng.randint(2, 6), rng.randint(1, top)
    prompt = (f"{name} is {age} years old. {his.capitalize()} {relative} is {times} times as old. "
              f"How old will the {relative} be in {years} years?")
    steps = [f"The {relative} is {times} * {age} = {times * age} years old now.",
             f"In {years} years: {times * age} + {years} = {times * age + years}."]
    return (age, times, years), prompt, steps, times * age + years


def _saving(rng: random.Random, top: int):
    name = rng.choice(_PEOPLE)[0]
    one, _ = rng.choice(_GOODS)
    per_week, weeks = rng.randint(1, top), rng.randint(2, 12)
    cost = rng.randint(1, per_week * weeks)
    prompt = (f"{name} saves ${per_week} each week for {weeks} weeks and then spends ${cost} on a {one}. "
              "How many dollars are left?")
    steps = [f"Saved: {weeks} * {per_week} = {weeks * per_week} dollars.",
             f"Left: {weeks * per_week} - {cost} = {weeks * per_week - cost}."]
    return (per_week, weeks, cost), prompt, steps, weeks * per_week - cost


def _baking(rng: random.Random, top: int):
    trays, per_tray = rng.randint(2, 9), rng.randint(2, top)
    baked = trays * per_tray
    box = rng.randint(2, min(6, baked - 1))
    burnt = baked % box or box  # at least one burns, and the rest fill whole boxes
    left = baked - burnt
    prompt = (f"A baker bakes {trays} trays with {per_tray} cookies on each tray. {burnt} cookies burn. "
              f"The rest are packed into boxes of {box}. How many boxes are filled?")
    steps = [f"Baked: {trays} * {per_tray} = {baked} cookies.", f"Not burnt: {baked} - {burnt} = {left}.",
             f"Boxes: {left} / {box} = {left // box}."]
    return (trays, per_tray, burnt, box), prompt, steps, left // box


def _pages(rng: random.Random, top: int):
    name = rng.choice(_PEOPLE)[0]
    per_day, days = rng.randint(2, top), rng.randint(2, 9)
    total = per_day * days + rng.randint(0, 10 * top)
    prompt = (f"A book has {total} pages. {name} reads {per_day} pages a day for {days} days. "
              "How many pages are left to read?")
    steps = [f"Read: {days} * {per_day} = {days * per_day} pages.",
             f"Left: {total} - {days * per_day} = {total - days * per_day}."]
    return (total, per_day, days), prompt, steps, total - days * per_day


TEMPLATES: dict[str, Template] = {
    "buy_then_give": _buy_then_give, "shopping": _shopping, "change": _change, "share": _share,
    "distance": _distance, "age": _age, "saving": _saving, "baking": _baking, "pages": _pages,
}


@dataclass
class WordProblemTask(Task):
    """A random template with quantities up to about max_number (prices, counts, ages)."""

    name = "word_problem"
    max_number: int = 20

    def __post_init__(self) -> None:
        check_int(self.name, "max_number", self.max_number, 4, 10**6)

    def problem(self, rng: random.Random) -> tuple[str, Row]:
        template = rng.choice(sorted(TEMPLATES))
        numbers, prompt, steps, answer = TEMPLATES[template](rng, self.max_number)
        row = Row(
            task=self.name, prompt=prompt, answer=str(answer),
            solution="\n".join([*steps, final_line(str(answer))]),
            meta={"template": template},
        )
        return f"{template}:{numbers}", row
