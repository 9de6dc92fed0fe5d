"""Generated corpora with known answers, for retrieval tests, benches and examples (nothing downloaded).

- `town_corpus`: one Markdown file per made-up town (geography, economy, history, food sections) and questions that
  paraphrase one fact each; a question is answered by the chunk that contains its `answer` string.
- `error_code_corpus`: manuals full of near-identical error codes (E-4721, E-4712, ...) whose descriptions come
  from a few templates, so only the exact code tells them apart: keyword queries where embeddings alone stumble.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

_SYLLABLES = "ka lo mi ra ven tos bel dor fin gar hal ist jun kel mor nar pel quin rus sol tam ul vor wen yar zel".split()
_INDUSTRIES = ["glass-blowing", "salt mining", "wool weaving", "shipbuilding", "clock making", "cheese making",
               "paper milling", "copper smelting", "silk dyeing", "rope making", "bell casting", "tea growing"]
_DISHES = ["smoked eel pie", "barley soup with plums", "honey-glazed turnips", "fried river trout", "chestnut bread",
           "spiced lentil stew", "goat cheese dumplings", "pickled herring", "mushroom pancakes", "roast quail"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _name(rng: random.Random, parts: int = 3) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()


@dataclass
class QA:
    question: str
    source: str  # the document that answers it
    answer: str  # a string the answering chunk contains


def town_corpus(n_towns: int = 30, seed: int = 0) -> tuple[dict[str, str], list[QA]]:
    """({filename: markdown}, questions) for `n_towns` towns with four facts each."""
    rng = random.Random(seed)
    docs, qas, used = {}, [], set()
    parts = 3 if n_towns <= 4000 else 4  # 26^3 names run out past a few thousand towns
    while len(docs) < n_towns:
        town = _name(rng, parts)
        if town in used:
            continue
        used.add(town)
        river, founder = _name(rng, 2), f"{_name(rng, 2)} {_name(rng, 2)}"
        industry, dish, month = rng.choice(_INDUSTRIES), rng.choice(_DISHES), rng.choice(_MONTHS)
        year, km = rng.randint(900, 1800), rng.randint(5, 90)
        file = f"{town.lower()}.md"
        docs[file] = (
            f"# {town}\n\n{town} is a small town known to travellers for its quiet streets and old stone bridges.\n\n"
            f"## Geography\n\n{town} lies on the eastern bank of the river {river}, about {km} kilometres from the "
            f"sea. The hills around it are covered in pine forest.\n\n"
            f"## Economy\n\nThe main trade of {town} is {industry}, which employs most families in the town. "
            f"Markets are held every Saturday in the square.\n\n"
            f"## History\n\n{town} was founded in {year} by {founder}, who built the first mill there. "
            f"The town walls were torn down two centuries later.\n\n"
            f"## Food and festivals\n\nVisitors to {town} should try {dish}, the local speciality. "
            f"The harvest festival of {town} takes place every {month}.\n")
        qas += [QA(f"Which river runs past {town}?", file, river),
                QA(f"What do most people in {town} do for a living?", file, industry),
                QA(f"Who founded {town}, and when?", file, founder),
                QA(f"What dish is {town} famous for?", file, dish)]
    return docs, qas


_SYMPTOMS = ["the inlet pressure sensor returns no reading", "the motor draws more current than its rating",
             "the coolant temperature rises above the limit", "the door interlock opens during a cycle"]
_FIXES = ["reseat the sensor cable and restart the controller", "check the motor bearings and the supply voltage",
          "clean the radiator fins and top up the coolant", "adjust the latch and test the interlock switch"]


def error_code_corpus(n_codes: int = 60, seed: int = 0) -> tuple[dict[str, str], list[QA]]:
    """({filename: markdown}, keyword questions): error codes from a few near-duplicate templates, 10 per manual."""
    rng = random.Random(seed)
    codes: list[str] = []
    while len(codes) < n_codes:  # pairs of codes that differ by one swapped digit pair: E-4721 / E-4712
        base = f"{rng.randint(1000, 9999)}"
        for c in (base, base[:2] + base[3] + base[2]):
            if f"E-{c}" not in codes and len(codes) < n_codes:
                codes.append(f"E-{c}")
    docs, qas = {}, []
    for m in range(0, n_codes, 10):
        file = f"manual_{m // 10 + 1}.md"
        parts = [f"# Pump controller manual, part {m // 10 + 1}\n"]
        for code in codes[m: m + 10]:
            k = rng.randrange(len(_SYMPTOMS))
            parts.append(f"## Error {code}\n\nThe controller shows {code} when {_SYMPTOMS[k]}. To clear {code}, "
                         f"{_FIXES[k]}.\n")
            qas.append(QA(f"What should I do about error {code}?", file, code))
        docs[file] = "\n".join(parts)
    return docs, qas


def write_corpus(docs: dict[str, str], folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder
