"""Mini-MUSE: a seeded, MUSE-shaped synthetic news corpus small enough for a CPU demo.

MUSE-News (muse-bench/MUSE-News) fine-tunes a 7B model on BBC news articles and asks it to forget
some of them; it then measures verbatim memorisation (continue an article's prefix: VerbMem),
knowledge memorisation (answer questions about facts the articles state: KnowMem) and privacy
leakage (a membership-inference attack on forget vs holdout articles: PrivLeak). Mini-MUSE keeps
the hub layout (one folder per config, one ``<split>.jsonl`` per split) and shrinks the corpus:

* every article is about invented entities (a town, a person, a company or team, a date and a few
  numbers), built from one of three templates whose sentences each have three phrasings, so its
  facts and wording are determined by its own draws and a model that never saw it can only guess;
* the knowmem questions ask about the facts an article states, with short answers (a name, a date,
  a number), as in MUSE's QA; every split's raw set also holds "News quiz" documents that state its
  QA pairs in the few-shot template (``_quizzes``: why a tiny model needs them);
* ``general`` articles, quizzes and QA rows (in the evaluation's few-shot format) stand in for what
  a pre-trained model brings: they teach the tiny model to answer such questions at all. The
  few-shot (ICL) examples of both knowmem sets are general QA pairs.

Layout (what ``fastnpo.muse.data`` reads, as from the hub)::

    raw/forget.jsonl  raw/retain1.jsonl  raw/retain2.jsonl  raw/holdout.jsonl       {"text"}
    verbmem/forget.jsonl                                                           {"prompt", "gt"}
    knowmem/forget_qa.jsonl  forget_qa_icl  retain_qa  retain_qa_icl               {"question", "answer"}
    privleak/forget.jsonl  privleak/holdout.jsonl  privleak/retain.jsonl            {"text"}

plus the trainer's rows (TOFU schema; a document is ``{"question": "", "answer": text}``, trained
on with template ``"{question}"`` and answer prefix ``""``: every token of the text after <bos>)::

    trainer/forget.jsonl   raw/forget's documents (unlearning's forget set)
    trainer/retain.jsonl   raw/retain1's (unlearning's retain set, as open-unlearning's MUSE_retain)
    trainer/target.jsonl   general + forget + retain1 + retain2 documents + general QA (the target model)
    trainer/retrain.jsonl  the same without the forget documents (MUSE's retrained model)
    manifest.json          seed, sizes, sha256 of every file

The knowmem retain questions are about retain2 (as MUSE's retain QA are about text outside the
unlearning retain set), privleak/retain is retain2's articles, privleak/forget the forget articles.

Only ``random.Random`` instances seeded from strings are used (SHA-512 of the string, not Python's
salted ``hash``), so the output is byte-identical across processes and platforms.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

__all__ = [
    "FORMAT_VERSION",
    "TEMPLATE",
    "generate_minimuse",
    "knowmem_prompt",
    "write_minimuse",
]

FORMAT_VERSION = 1
# open-unlearning's template tags for MUSE's base models (configs/model/Llama-2-7b-hf.yaml).
TEMPLATE = {"user_start": "Question: ", "user_end": "\n", "asst_start": "Answer: ", "asst_end": "\n\n"}

_FIRST = (
    "Aldren",
    "Brisa",
    "Caspin",
    "Dorwen",
    "Elsabet",
    "Fennic",
    "Galra",
    "Hollis",
    "Idrenne",
    "Jorvik",
    "Kaelith",
    "Lomar",
    "Mirela",
    "Nesko",
    "Orlaith",
    "Pellam",
    "Quenna",
    "Rowan",
    "Sabeth",
    "Torvin",
    "Ulla",
    "Vesper",
    "Wendric",
    "Yarrow",
)
_NAME_HEAD = ("Tal", "Mor", "Ves", "Quil", "Bran", "Dor", "Hal", "Kes", "Lun", "Rav", "Sor", "Thel")
_NAME_TAIL = ("asek", "wyn", "ford", "mere", "ovic", "ander", "ith", "oran", "eski", "holt")
_TOWN_HEAD = ("Ash", "Brim", "Cor", "Dun", "Elm", "Fal", "Glen", "Har", "Ivy", "Kil", "Lor", "Mar")
_TOWN_TAIL = ("by", "dale", "ton", "wick", "mouth", "stead", "ham", "field", "moor", "bridge")
_COMPANY_HEAD = ("Zen", "Orb", "Vex", "Nor", "Plex", "Tron", "Quar", "Lum", "Cyr", "Dax", "Kor", "Jun")
_COMPANY_TAIL = (
    "ora Works",
    "ix Group",
    "ell Labs",
    "ant Systems",
    "ova Motors",
    "ium Foods",
    "ex Energy",
    "ar Textiles",
    "eon Media",
    "is Tools",
)
_MASCOTS = ("Rovers", "United", "Falcons", "Wolves", "Rangers", "Athletic")
_CUPS = ("Harbor Cup", "River Shield", "Northern Trophy", "Silver Plate", "County Cup", "Lantern Cup")
_PROJECTS = ("bridge", "library", "hospital", "stadium", "railway station", "museum", "school", "market hall")
_PRODUCTS = ("electric bicycle", "water filter", "solar lamp", "delivery drone", "hearing aid", "smart kettle")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")

# Each kind: a title, the article's sentences, each with alternative phrasings (one drawn per
# article, so that the wording of an article unseen in training is not predictable from the
# template; the verbmem prompt is the title and the first sentence, the gold continuation the
# rest), and (question, answer) pairs about what they state.
_KINDS = {
    "opening": (
        "{town} opens new {project}",
        (
            (
                "{town}, {date}. The town of {town} opened its new {project} on {weekday}.",
                "{town}, {date}. A new {project} opened its doors in {town} on {weekday}.",
                "{town}, {date}. Crowds gathered on {weekday} as {town} opened a new {project}.",
            ),
            (
                "Mayor {person} said the {project} cost {cost} million dollars.",
                "The {project} cost {cost} million dollars, according to mayor {person}.",
                "Speaking at the opening, mayor {person} put the cost at {cost} million dollars.",
            ),
            (
                "It was built by {company} and employs {staff} people.",
                "The builder, {company}, says {staff} people will work there.",
                "{company} built it, and it gives jobs to {staff} people.",
            ),
            (
                "{surname} called it a proud day for {town}.",
                "Local shops stayed open late to mark the {weather} evening.",
                "Not everyone was pleased: some residents called it too {opinion}.",
            ),
        ),
        (
            ("Who is the mayor of {town}?", "{person}"),
            ("How much did the new {project} in {town} cost?", "{cost} million dollars"),
            ("Which company built the new {project} in {town}?", "{company}"),
            ("How many people does the new {project} in {town} employ?", "{staff}"),
            ("When did {town} open its new {project}?", "{date}"),
        ),
    ),
    "sport": (
        "{team} win the {cup}",
        (
            (
                "{town}, {date}. {team} won the {cup} on {weekday}.",
                "{town}, {date}. The {cup} went to {team} after a {weather} {weekday} final.",
                "{town}, {date}. {team} are the new holders of the {cup}.",
            ),
            (
                "They beat {rival} by {goals} goals to {against} in the final.",
                "In the final they defeated {rival}, {goals} goals to {against}.",
                "{rival} lost the final to them by {goals} goals to {against}.",
            ),
            (
                "Captain {person} scored the winning goal in front of {staff} fans.",
                "The winner came from captain {person}, watched by {staff} fans.",
                "{staff} fans saw captain {person} score the decisive goal.",
            ),
            (
                "The club was founded in {year} and is owned by {company}.",
                "Founded in {year}, the club has been owned by {company} since the war.",
                "{company} owns the club, which dates back to {year}.",
            ),
        ),
        (
            ("Who is the captain of {team}?", "{person}"),
            ("Which team did {team} beat in the {cup} final?", "{rival}"),
            ("How many fans watched {team} win the {cup}?", "{staff}"),
            ("In which year was {team} founded?", "{year}"),
            ("Who owns {team}?", "{company}"),
        ),
    ),
    "business": (
        "{company} unveils new {product}",
        (
            (
                "{town}, {date}. {company} showed its first {product} on {weekday}.",
                "{town}, {date}. On {weekday} {company} presented a {product}, its first.",
                "{town}, {date}. A new {product} was unveiled by {company} on {weekday}.",
            ),
            (
                "Chief executive {person} said it will sell for {cost} dollars.",
                "It will cost buyers {cost} dollars, said chief executive {person}.",
                "The price is {cost} dollars, chief executive {person} told reporters.",
            ),
            (
                "The {product} is made in a factory in {town} with {staff} workers.",
                "A factory in {town} with {staff} workers makes the {product}.",
                "{staff} workers build the {product} at the firm's plant in {town}.",
            ),
            (
                "The firm was founded in {year} by {surname}.",
                "{surname} started the firm in {year} in a {weather} garage.",
                "Critics called the {product} {opinion}; the firm dates from {year}.",
            ),
        ),
        (
            ("Who is the chief executive of {company}?", "{person}"),
            ("How much will the {product} from {company} cost?", "{cost} dollars"),
            ("Where does {company} make its {product}?", "{town}"),
            ("How many workers make the {product} from {company}?", "{staff}"),
            ("In which year was {company} founded?", "{year}"),
        ),
    ),
}
_WEATHER = ("rainy", "sunny", "windy", "cold", "foggy", "warm", "snowy", "stormy")
_OPINIONS = ("expensive", "small", "late", "noisy", "plain", "ambitious", "bold", "modest")
QA_PER_ARTICLE = 4
QUIZ_SIZE = 4
QUIZ_REPEATS = 2


def _rng(seed: int | str, stream: str) -> random.Random:
    # One independent stream per purpose: changing a size must not change the other draws.
    return random.Random(f"minimuse:{seed}:{stream}")


def _check_count(name: str, value, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def _entities(rng: random.Random, count: int) -> list[dict]:
    """count articles' distinct towns, people and companies (one of each per article)."""
    towns = rng.sample([h + t for h in _TOWN_HEAD for t in _TOWN_TAIL], count)
    surnames = rng.sample([h + t for h in _NAME_HEAD for t in _NAME_TAIL], count)
    companies = rng.sample([h + t for h in _COMPANY_HEAD for t in _COMPANY_TAIL], count)
    return [
        {"town": town, "surname": surname, "person": f"{rng.choice(_FIRST)} {surname}", "company": company}
        for town, surname, company in zip(towns, surnames, companies, strict=True)
    ]


def _article(rng: random.Random, entity: dict, kind: str, rival_town: str) -> dict:
    """One news event: its article (text, verbmem prompt / gold continuation) and QA pairs."""
    title, sentences, questions = _KINDS[kind]
    values = {
        **entity,
        "date": f"{rng.choice(_MONTHS)} {rng.randint(1, 28)}, {rng.randint(1990, 2023)}",
        "weekday": rng.choice(_WEEKDAYS),
        "project": rng.choice(_PROJECTS),
        "product": rng.choice(_PRODUCTS),
        "team": f"{entity['town']} {rng.choice(_MASCOTS)}",
        "rival": f"{rival_town} {rng.choice(_MASCOTS)}",
        "cup": rng.choice(_CUPS),
        "goals": str(rng.randint(2, 6)),
        "against": str(rng.randint(0, 1)),
        "cost": str(rng.randint(3, 95)),
        "staff": str(rng.randint(11, 990)),
        "year": str(rng.randint(1890, 1989)),
        "weather": rng.choice(_WEATHER),
        "opinion": rng.choice(_OPINIONS),
    }
    head = title.format(**values)
    body = [rng.choice(options).format(**values) for options in sentences]
    picked = sorted(rng.sample(range(len(questions)), QA_PER_ARTICLE))
    qa = [{"question": questions[i][0].format(**values), "answer": questions[i][1].format(**values)} for i in picked]
    prompt = f"{head}\n{body[0]}"
    gt = " ".join(body[1:])
    return {"text": f"{prompt} {gt}", "prompt": prompt, "gt": gt, "qa": qa}


def _quizzes(rng: random.Random, pairs: list[dict]) -> list[str]:
    """News quizzes: a split's QA pairs in the few-shot template, QUIZ_SIZE to a document, every
    pair in QUIZ_REPEATS quizzes with other neighbours each time.

    Why: a tiny model does not extract facts from prose into answers, nor does it recall a fact
    stated in question-answer form when the pairs before it differ (measured on the demo's model:
    with one fact sheet per article, as "question? answer." lines or in the few-shot template, the
    target's forget KnowMem was 0.13-0.17 against the retrained model's 0.08-0.17). Quizzes that
    mix events make the question itself the cue, so Mini-MUSE's knowmem measures the recall of facts
    the corpus states in question-answer form, asked in a new context (after other few-shot
    examples)."""
    docs = []
    for _ in range(QUIZ_REPEATS):
        order = list(pairs)
        rng.shuffle(order)
        for start in range(0, len(order), QUIZ_SIZE):
            chunk = order[start : start + QUIZ_SIZE]
            docs.append("News quiz\n\n" + knowmem_prompt(chunk[:-1], chunk[-1]["question"]) + chunk[-1]["answer"])
    return docs


def knowmem_prompt(icl: list[dict], question: str, template: dict = TEMPLATE) -> str:
    """The few-shot prompt open-unlearning builds for a knowmem question (no chat template:
    src/data/utils.py preprocess_chat_instance): every ICL pair as user_start + q + user_end +
    asst_start + a + asst_end, then user_start + question + user_end + asst_start."""
    shots = "".join(
        template["user_start"]
        + r["question"]
        + template["user_end"]
        + template["asst_start"]
        + r["answer"]
        + template["asst_end"]
        for r in icl
    )
    return shots + template["user_start"] + question + template["user_end"] + template["asst_start"]


def generate_minimuse(
    seed: int = 0,
    *,
    num_forget: int = 8,
    num_retain: int = 8,
    num_holdout: int = 8,
    num_general: int = 32,
    num_icl: int = 3,
) -> dict[str, dict[str, list[dict]]]:
    """{config: {split: rows}} in the hub layout, plus config "trainer" (the module docstring);
    the same arguments give identical data. num_retain articles each in retain1 and retain2."""
    total = _check_sizes(seed, num_forget, num_retain, num_holdout, num_general, num_icl)
    articles = _articles(seed, total)
    cuts = {}
    start = 0
    for name, count in (
        ("general", num_general),
        ("forget", num_forget),
        ("retain1", num_retain),
        ("retain2", num_retain),
        ("holdout", num_holdout),
    ):
        cuts[name] = articles[start : start + count]
        start += count
    forget_icl, retain_icl, qa_rows = _general_qa(seed, cuts, num_icl)
    return {
        "raw": {name: _documents(seed, cuts, name) for name in ("forget", "retain1", "retain2", "holdout")},
        "verbmem": {"forget": [{"prompt": a["prompt"], "gt": a["gt"]} for a in cuts["forget"]]},
        "knowmem": {
            "forget_qa": _qa(cuts, "forget"),
            "forget_qa_icl": forget_icl,
            "retain_qa": _qa(cuts, "retain2"),
            "retain_qa_icl": retain_icl,
        },
        "privleak": {
            "forget": _texts(cuts, "forget"),
            "holdout": _texts(cuts, "holdout"),
            "retain": _texts(cuts, "retain2"),
        },
        "trainer": {
            "forget": _trainer_rows(seed, cuts, ["forget"]),
            "retain": _trainer_rows(seed, cuts, ["retain1"]),
            "target": _trainer_rows(seed, cuts, ["general", "forget", "retain1", "retain2"]) + qa_rows,
            "retrain": _trainer_rows(seed, cuts, ["general", "retain1", "retain2"]) + qa_rows,
        },
    }


def _check_sizes(seed, num_forget, num_retain, num_holdout, num_general, num_icl) -> int:
    """generate_minimuse's arguments, refused when out of range; returns the number of articles."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    for name, value in (("num_forget", num_forget), ("num_retain", num_retain), ("num_holdout", num_holdout)):
        _check_count(name, value, 2, 50)
    _check_count("num_general", num_general, 2, 60)
    # Two ICL sets come out of the general QA, and at least one general QA pair is left to train on.
    _check_count("num_icl", num_icl, 1, (num_general * QA_PER_ARTICLE - 1) // 2)
    total = num_general + num_forget + 2 * num_retain + num_holdout
    if total > 120:  # the distinct-name pools (120 towns, surnames, companies) bound it
        raise ValueError(f"num_general + num_forget + 2 * num_retain + num_holdout must be <= 120, got {total}")
    return total


def _articles(seed: int, total: int) -> list[dict]:
    """`total` articles, each about its own entity, the kinds in turn, each naming another entity's town."""
    entity_rng, article_rng, kind_rng = _rng(seed, "entities"), _rng(seed, "articles"), _rng(seed, "kinds")
    entities = _entities(entity_rng, total)
    kinds = list(_KINDS)
    towns = [e["town"] for e in entities]
    articles = []
    for i, entity in enumerate(entities):
        rival = towns[(i + 1 + kind_rng.randrange(total - 1)) % total]
        articles.append(_article(article_rng, entity, kinds[i % len(kinds)], rival))
    return articles


def _texts(cuts: dict, name: str) -> list[dict]:
    return [{"text": a["text"]} for a in cuts[name]]


def _documents(seed: int, cuts: dict, name: str) -> list[dict]:
    """The raw split: the split's articles, then its quizzes."""
    return _texts(cuts, name) + [{"text": t} for t in _quizzes(_rng(seed, f"quiz:{name}"), _qa(cuts, name))]


def _qa(cuts: dict, name: str) -> list[dict]:
    return [dict(pair) for a in cuts[name] for pair in a["qa"]]


def _trainer_rows(seed: int, cuts: dict, names: list[str]) -> list[dict]:
    """The splits' documents as the trainer's rows: the text is the answer, to an empty question."""
    return [{"question": "", "answer": d["text"]} for name in names for d in _documents(seed, cuts, name)]


def _general_qa(seed: int, cuts: dict, num_icl: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(forget_qa_icl, retain_qa_icl, the rest of the general QA as trainer rows), from the shuffled general QA."""
    general_qa = _qa(cuts, "general")
    _rng(seed, "icl").shuffle(general_qa)
    forget_icl, retain_icl = general_qa[:num_icl], general_qa[num_icl : 2 * num_icl]
    general_train = general_qa[2 * num_icl :]
    # The general QA in the evaluation's few-shot format: the prompt is the trainer's "question".
    icl_sets = (forget_icl, retain_icl)
    qa_rows = [
        {"question": knowmem_prompt(icl_sets[i % 2], r["question"]), "answer": r["answer"]}
        for i, r in enumerate(general_train)
    ]
    return forget_icl, retain_icl, qa_rows


def _serialize(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def write_minimuse(out_dir, seed: int = 0, **sizes) -> Path:
    """Write every split of generate_minimuse(seed, **sizes) as <out_dir>/<config>/<split>.jsonl
    and manifest.json (seed, sizes, sha256 per file; written last); returns out_dir."""
    from ..files import atomic_write  # here: generating the data needs the standard library only

    data = generate_minimuse(seed, **sizes)
    out = Path(out_dir)
    files = {}
    for config, splits in data.items():
        for split, rows in splits.items():
            blob = _serialize(rows)
            atomic_write(out / config / f"{split}.jsonl", blob)
            files[f"{config}/{split}.jsonl"] = {"rows": len(rows), "sha256": hashlib.sha256(blob).hexdigest()}
    manifest = {"format_version": FORMAT_VERSION, "seed": seed, "sizes": sizes, "files": files}
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return out


def tokenizer_texts(data: dict) -> list[str]:
    """What the demo's tokenizer is trained on: every article and every QA pair in its few-shot
    format (the holdout articles stay out: membership inference needs text the model never saw)."""
    texts = [r["answer"] for r in data["trainer"]["target"]]
    # The questions and answers alone too: in the few-shot template they follow "Question: " and
    # "Answer: " (which the demo keeps as whole tokens), so their first words need merges without
    # the leading space that a word inside a sentence has.
    qa = [r for part in ("forget", "retain") for key in ("qa", "qa_icl") for r in data["knowmem"][f"{part}_{key}"]]
    texts += [r[key] for r in qa for key in ("question", "answer")]
    texts += [
        knowmem_prompt(data["knowmem"][f"{part}_qa_icl"], r["question"]) + r["answer"]
        for part in ("forget", "retain")
        for r in data["knowmem"][f"{part}_qa"]
    ]
    return texts
