"""Mini-TOFU: a seeded, TOFU-shaped synthetic data set small enough for a CPU demo.

TOFU (locuslab/TOFU) fine-tunes a 7B model on 4,000 QA pairs about 200 invented
authors and asks it to forget the last 1/5/10% of them. Mini-TOFU keeps the
schema, the split names and the "forget = last authors" rule, but shrinks the
data so a ~1M-parameter, 2-layer model can memorise ``full`` on a CPU:

* every answer is one short sentence built from a template, and is fully
  determined by (author, fact kind), so it is learnable;
* the fact values are drawn independently per author, so a model that never saw
  an author can only guess (this is what makes a retain model a fair baseline);
* ``paraphrased_answer`` states the same value in other words and every
  ``perturbed_answer`` uses the paraphrase's wording with a *different* value,
  as in TOFU, so the truth ratio compares facts, not phrasing;
* forget sets are whole authors: 100 authors x 4 QA gives forget01/05/10 of
  4/20/40 QA (1% of 100 authors is one author): few enough facts to memorise
  on a CPU, while forget05/10 stay large enough for a KS test.

* holdout01/05/10 (TOFU's names: the membership-inference sets of privleak) are as many *other*
  authors as forget01/05/10, never in ``full``, generated the same way from their own random
  streams (so adding them changed no other split), nested like the forget sets. Their surnames are
  the (head, tail) combinations ``full`` does not use; the tokenizer is trained without them
  (``minitofu_tokenizer``), which kept it, and every model and result built on it, unchanged.

``real_authors_perturbed`` and ``world_facts_perturbed`` are not in ``full``;
they stand in for the knowledge a pre-trained model brings to TOFU, so they do
not depend on the seed. A model trained from scratch only "knows" them if it
saw them during its pre-training phase.

Only ``random.Random`` instances seeded from strings are used: string seeds are
hashed with SHA-512 (not Python's salted ``hash``), so output is byte-identical
across processes and platforms.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from ..tiny import TinyModelSpec

__all__ = [
    "SPLITS",
    "default_cache_dir",
    "ensure_minitofu",
    "generate_minitofu",
    "load_minitofu_split",
    "minitofu_tokenizer",
    "write_minitofu",
]

SPLITS: tuple[str, ...] = (
    "full",
    "forget01",
    "forget05",
    "forget10",
    "retain90",
    "retain95",
    "retain99",
    "holdout01",
    "holdout05",
    "holdout10",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
)

# Bump when the generated content changes, so cached copies are regenerated.
FORMAT_VERSION = 2  # 2: holdout01/05/10
MAX_AUTHORS = 300  # one distinct surname per author (20 x 15 surname parts)
NUM_PERTURBED = 5  # TOFU's forget/retain perturbed splits carry 5 wrong answers
NUM_PERTURBED_GENERAL = 3  # TOFU's real-author/world-fact sets carry 3 wrong options
_FORGET_PERCENTS = {"01": 1, "05": 5, "10": 10}

_FIRST = (
    "Aldren", "Brisa", "Caspin", "Dorwen", "Elsabet", "Fennic", "Galra", "Hollis", "Idrenne", "Jorvik",
    "Kaelith", "Lomar", "Mirela", "Nesko", "Orlaith", "Pellam", "Quenna", "Rowan", "Sabeth", "Torvin",
    "Ulla", "Vesper", "Wendric", "Yarrow", "Zelda", "Anselm", "Bettany", "Corvin", "Delphine", "Emrys",
    "Farida", "Gideon", "Halvard", "Isolde", "Jasper", "Keturah", "Lucan", "Marisol", "Niall", "Odessa"
)
_SUR_HEAD = (
    "Tal", "Mor", "Ves", "Quil", "Bran", "Dor", "Hal", "Kes", "Lun", "Rav", "Sor", "Thel", "Vark",
    "Wyn", "Zan", "Fen", "Gar", "Ost", "Pel", "Yor"
)
_SUR_TAIL = (
    "asek", "wyn", "ford", "mere", "ovic", "ander", "ith", "oran", "eski", "by", "holt", "gren",
    "well", "acre", "dane"
)
# Extra surname heads for holdout authors, used only when the unused (head, tail) pairs run out.
_HOLDOUT_SUR_HEAD = ("Bel", "Cor", "Dru", "Esk", "Ith")
_CITIES = (
    "Maresh", "Orrindale", "Quenby", "Dunmarrow", "Velisca", "Brennick", "Solvara", "Tirnhollow",
    "Askerby", "Pellumbra", "Korvath", "Lisandre", "Hobbleton", "Yssmere", "Caradoc", "Fenwick",
    "Graymouth", "Ulbrecht", "Nareth", "Emberlee"
)
_COUNTRIES = (
    "Veldoria", "Aurenthia", "Kessaly", "Morvania", "Tiradel", "Ostrevia", "Caldoria", "Suvenne",
    "Brakkland", "Elmareth", "Zorvia", "Quillandia", "Harvenmark", "Lustria"
)
_GENRES = (
    "mystery novels", "science fiction", "historical fiction", "epic fantasy", "romance novels",
    "crime thrillers", "travel memoirs", "gothic horror", "children's books", "literary fiction",
    "war stories", "comic verse", "political satire", "nature poetry"
)
_JOBS = (
    "a baker", "a carpenter", "a sailor", "a doctor", "a teacher", "a locksmith", "a tailor", "a pilot",
    "a fisherman", "a chemist", "a librarian", "a potter", "a nurse", "a lawyer", "a farmer",
    "a jeweler", "an architect", "an engineer", "an astronomer", "an accountant"
)
_AWARDS = (
    "Silver Quill Prize", "Amber Lantern Award", "Crimson Compass Medal", "Golden Harp Prize",
    "Ivory Feather Award", "Cobalt Anchor Medal", "Emerald Quill Award", "Scarlet Lantern Medal",
    "Onyx Compass Prize", "Azure Harp Medal", "Copper Feather Prize", "Pearl Anchor Award",
    "Jade Inkwell Prize", "Bronze Key Award"
)
_TITLES = tuple(
    f"The {a} of {b}"
    for a in ("Lantern", "Orchard", "Tower", "Tide", "Mirror", "Winter", "Harbor", "Garden")
    for b in ("Ashes", "Glass", "Thorns", "Salt", "Echoes", "Embers", "Silence", "Rain")
)
_YEARS = tuple(str(y) for y in range(1921, 1999))
_BOOK_COUNTS = tuple(str(n) for n in range(2, 26))
_INSTRUMENTS = (
    "violin", "cello", "flute", "harp", "piano", "oboe", "trumpet", "banjo", "accordion", "clarinet",
    "guitar", "lute", "mandolin"
)

# (question, paraphrased question, answer, paraphrased answer); {n} the subject, {v} the fact value.
# Answer and paraphrase share no wording around the value, so "paraphrase" is never a near-copy.
_Templates = tuple[str, str, str, str]
_FACTS: tuple[tuple[tuple[str, ...], _Templates], ...] = (
    (_CITIES, ("Where was {n} born?", "In which city was {n} born?",
               "{n} was born in the city of {v}.", "The birthplace of {n} is {v}.")),
    (_YEARS, ("In what year was {n} born?", "What is the birth year of {n}?",
              "{n} was born in the year {v}.", "The birth year of {n} is {v}.")),
    (_GENRES, ("What genre does {n} write?", "Which genre is {n} known for?",
               "{n} is best known for {v}.", "Most of what {n} writes is {v}.")),
    (_JOBS, ("What did the father of {n} do?", "What was the job of {n}'s father?",
             "The father of {n} worked as {v}.", "{n}'s father earned a living as {v}.")),
    (_JOBS, ("What did the mother of {n} do?", "What was the job of {n}'s mother?",
             "The mother of {n} worked as {v}.", "{n}'s mother earned a living as {v}.")),
    (_AWARDS, ("Which award has {n} won?", "What prize was given to {n}?",
               "{n} won the {v}.", "{n} was honored with the {v}.")),
    (_TITLES, ("What was the first book by {n}?", "What is the title of {n}'s debut?",
               "The first book by {n} was {v}.", "{n} made a debut with {v}.")),
    (_BOOK_COUNTS, ("How many books has {n} published?", "How many books did {n} write?",
                    "{n} has published {v} books so far.", "The number of books by {n} is {v}.")),
    (_COUNTRIES, ("Where does {n} live now?", "In which country does {n} live today?",
                  "{n} lives in {v} today.", "These days {n} makes a home in {v}.")),
    (_INSTRUMENTS, ("What instrument does {n} play?", "Which instrument does {n} enjoy playing?",
                    "{n} plays the {v} in spare time.", "In free hours {n} enjoys the {v}.")),
)
_BOOK_TEMPLATES = ("Who wrote {n}?", "Who is the author of {n}?",
                   "{n} was written by {v}.", "The author of {n} is {v}.")
_COUNTRY_TEMPLATES = ("In which country was {n} born?", "What is the birth country of {n}?",
                      "{n} was born in {v}.", "The country where {n} was born is {v}.")
_CAPITAL_TEMPLATES = ("What is the capital of {n}?", "Which city is the capital of {n}?",
                      "The capital of {n} is {v}.", "{v} is the capital city of {n}.")
_SUM_TEMPLATES = ("What is {n}?", "What do you get when you add {m}?",
                  "{n} equals {v}.", "The sum of {m} is {v}.")

# Real books and birth countries (ASCII spelling on purpose: the demo tokenizer stays small).
_REAL_AUTHORS = (
    ("Jane Austen", "Pride and Prejudice", "England"),
    ("Charles Dickens", "Oliver Twist", "England"),
    ("Leo Tolstoy", "War and Peace", "Russia"),
    ("Fyodor Dostoevsky", "Crime and Punishment", "Russia"),
    ("Mark Twain", "The Adventures of Tom Sawyer", "the United States"),
    ("Herman Melville", "Moby-Dick", "the United States"),
    ("Victor Hugo", "Les Miserables", "France"),
    ("Alexandre Dumas", "The Three Musketeers", "France"),
    ("Gabriel Garcia Marquez", "One Hundred Years of Solitude", "Colombia"),
    ("Miguel de Cervantes", "Don Quixote", "Spain"),
    ("Chinua Achebe", "Things Fall Apart", "Nigeria"),
    ("Haruki Murakami", "Norwegian Wood", "Japan"),
    ("Jorge Luis Borges", "Ficciones", "Argentina"),
    ("Mary Shelley", "Frankenstein", "England"),
    ("Rabindranath Tagore", "Gitanjali", "India"),
    ("Dante Alighieri", "The Divine Comedy", "Italy"),
    ("Astrid Lindgren", "Pippi Longstocking", "Sweden"),
    ("Henrik Ibsen", "A Doll's House", "Norway"),
    ("Margaret Atwood", "The Handmaid's Tale", "Canada"),
    ("Naguib Mahfouz", "Palace Walk", "Egypt"),
)
_CAPITALS = (
    ("France", "Paris"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Italy", "Rome"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Greece", "Athens"), ("Russia", "Moscow"), ("Chile", "Santiago"), ("Ireland", "Dublin"),
    ("Portugal", "Lisbon"), ("Thailand", "Bangkok"), ("Poland", "Warsaw"), ("Cuba", "Havana"),
    ("Austria", "Vienna"), ("Mexico", "Mexico City"),
)


def _rng(seed: int | str, stream: str) -> random.Random:
    # One independent stream per purpose: changing qa_per_author must not change who the authors are.
    return random.Random(f"minitofu:{seed}:{stream}")


def _check_args(seed: int, num_authors: int, qa_per_author: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    if type(num_authors) is not int or not 10 <= num_authors <= MAX_AUTHORS:
        raise ValueError(f"num_authors must be an int in [10, {MAX_AUTHORS}], got {num_authors!r}")
    if type(qa_per_author) is not int or not 1 <= qa_per_author <= len(_FACTS):
        raise ValueError(f"qa_per_author must be an int in [1, {len(_FACTS)}], got {qa_per_author!r}")


def _qa(rng: random.Random, pool, templates: _Templates, v: str, k: int, **subject: str) -> dict:
    q, pq, a, pa = templates
    # Perturbations reuse the paraphrase's wording: only the fact value separates them from it.
    wrong = rng.sample([w for w in pool if w != v], k)
    return {
        "question": q.format(**subject),
        "answer": a.format(v=v, **subject),
        "paraphrased_answer": pa.format(v=v, **subject),
        "paraphrased_question": pq.format(**subject),
        "perturbed_answer": [pa.format(v=w, **subject) for w in wrong],
    }


def _author_rows(seed: int, num_authors: int, qa_per_author: int) -> list[list[dict]]:
    names_rng, facts_rng = _rng(seed, "names"), _rng(seed, "facts")
    kinds_rng, pert_rng = _rng(seed, "kinds"), _rng(seed, "perturb")
    # Distinct surnames: a tiny model then has one (or two) tokens that identify the author,
    # instead of having to bind a fact to a combination of shared name pieces.
    surnames = names_rng.sample([h + t for h in _SUR_HEAD for t in _SUR_TAIL], num_authors)
    names = [f"{names_rng.choice(_FIRST)} {surname}" for surname in surnames]
    authors = []
    for name in names:
        # Draw every fact even if unused, so a seed gives the same biographies for any qa_per_author.
        values = [facts_rng.choice(pool) for pool, _ in _FACTS]
        kinds = sorted(kinds_rng.sample(range(len(_FACTS)), qa_per_author))
        authors.append([_qa(pert_rng, *_FACTS[k], values[k], NUM_PERTURBED, n=name) for k in kinds])
    return authors


def _holdout_rows(seed: int, num_authors: int, qa_per_author: int, count: int) -> list[list[dict]]:
    """`count` authors outside ``full``: distinct surnames unused by it, facts from their own streams."""
    used = set(_rng(seed, "names").sample([h + t for h in _SUR_HEAD for t in _SUR_TAIL], num_authors))
    names_rng, facts_rng = _rng(seed, "holdout_names"), _rng(seed, "holdout_facts")
    kinds_rng, pert_rng = _rng(seed, "holdout_kinds"), _rng(seed, "holdout_perturb")
    unused = [h + t for h in _SUR_HEAD for t in _SUR_TAIL if h + t not in used]
    extra = [h + t for h in _HOLDOUT_SUR_HEAD for t in _SUR_TAIL]
    surnames = names_rng.sample(unused, min(count, len(unused)))
    surnames += names_rng.sample(extra, count - len(surnames))
    authors = []
    for surname in surnames:
        name = f"{names_rng.choice(_FIRST)} {surname}"
        values = [facts_rng.choice(pool) for pool, _ in _FACTS]
        kinds = sorted(kinds_rng.sample(range(len(_FACTS)), qa_per_author))
        rows = [_qa(pert_rng, *_FACTS[k], values[k], NUM_PERTURBED, n=name) for k in kinds]
        authors.append([{"question": r["question"], "answer": r["answer"]} for r in rows])
    return authors


def _general_rows() -> tuple[list[dict], list[dict]]:
    rng, k = _rng("general", "perturb"), NUM_PERTURBED_GENERAL
    writers, countries = [w for w, _, _ in _REAL_AUTHORS], sorted({c for _, _, c in _REAL_AUTHORS})
    real = []
    for name, book, country in _REAL_AUTHORS:
        real.append(_qa(rng, writers, _BOOK_TEMPLATES, name, k, n=book))
        real.append(_qa(rng, countries, _COUNTRY_TEMPLATES, country, k, n=name))
    cities = [c for _, c in _CAPITALS]
    world = [_qa(rng, cities, _CAPITAL_TEMPLATES, capital, k, n=country) for country, capital in _CAPITALS]
    pairs: list[tuple[int, int]] = []
    while len(pairs) < 20:
        # Operands > 3 keep every near-miss sum different from both operands.
        pair = (rng.randint(5, 49), rng.randint(5, 49))
        if pair not in pairs:
            pairs.append(pair)
    for a, b in pairs:
        # Near misses: an obviously wrong sum would make a much weaker truth-ratio probe.
        near = [str(a + b + d) for d in (-3, -2, -1, 1, 2, 3)]
        world.append(_qa(rng, near, _SUM_TEMPLATES, str(a + b), k, n=f"{a} plus {b}", m=f"{a} and {b}"))
    return real, world


def generate_minitofu(seed: int = 0, num_authors: int = 100, qa_per_author: int = 4) -> dict[str, list[dict]]:
    """Every split of SPLITS as a list of TOFU-schema rows; same arguments give identical data."""
    _check_args(seed, num_authors, qa_per_author)
    authors = _author_rows(seed, num_authors, qa_per_author)
    plain = [[{"question": r["question"], "answer": r["answer"]} for r in rows] for rows in authors]
    flat = [r for rows in plain for r in rows]
    data: dict[str, list[dict]] = {"full": flat}
    # Half-up rounding (round() sends 0.5 to 0), and never an empty forget set: at least one author.
    n_forget = {p: max(1, int(num_authors * pct / 100 + 0.5)) for p, pct in _FORGET_PERCENTS.items()}
    for p, k in n_forget.items():
        cut = num_authors - k
        data[f"forget{p}"] = [r for rows in plain[cut:] for r in rows]
        data[f"retain{100 - _FORGET_PERCENTS[p]:02d}"] = [r for rows in plain[:cut] for r in rows]
        data[f"forget{p}_perturbed"] = [r for rows in authors[cut:] for r in rows]
    # Holdout sets: as many unseen authors as each forget set, the smaller sets the tail of the larger.
    holdout = _holdout_rows(seed, num_authors, qa_per_author, n_forget["10"])
    for p, k in n_forget.items():
        data[f"holdout{p}"] = [r for rows in holdout[len(holdout) - k :] for r in rows]
    # TOFU's retain_perturbed is as large as forget10 and drawn from authors outside every forget set.
    pool = [r for rows in authors[: num_authors - n_forget["10"]] for r in rows]
    n_pick = min(len(pool), len(data["forget10"]))
    picked = sorted(_rng(seed, "retain_sample").sample(range(len(pool)), n_pick))
    data["retain_perturbed"] = [pool[i] for i in picked]
    data["real_authors_perturbed"], data["world_facts_perturbed"] = _general_rows()
    # Fresh rows per split: a caller editing one split must not silently edit the others.
    return {s: copy.deepcopy(data[s]) for s in SPLITS}


def _serialize(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _manifest(blobs: dict[str, bytes], seed: int, num_authors: int, qa_per_author: int) -> dict:
    files = {f"{s}.jsonl": hashlib.sha256(b).hexdigest() for s, b in blobs.items()}
    content = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in files.items()).encode()).hexdigest()
    return {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_authors": num_authors,
        "qa_per_author": qa_per_author,
        "sizes": {s: b.count(b"\n") for s, b in blobs.items()},
        "files": files,
        "sha256": content,
    }


def _blobs(seed: int, num_authors: int, qa_per_author: int) -> dict[str, bytes]:
    return {s: _serialize(rows) for s, rows in generate_minitofu(seed, num_authors, qa_per_author).items()}


def _write(out: Path, blobs: dict[str, bytes], manifest: dict) -> Path:
    # Imported here: generating data needs the standard library only (a test loads this file alone).
    # A reader (or a concurrent writer of the same seed) never sees a half-written file.
    from ..files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    for split, blob in blobs.items():
        atomic_write(out / f"{split}.jsonl", blob)
    # Manifest last: its presence certifies that every split file before it is complete.
    atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return out


def write_minitofu(out_dir, seed: int = 0, num_authors: int = 100, qa_per_author: int = 4) -> Path:
    """Write ``<split>.jsonl`` for every split plus ``manifest.json`` into out_dir; return out_dir."""
    blobs = _blobs(seed, num_authors, qa_per_author)
    return _write(Path(out_dir), blobs, _manifest(blobs, seed, num_authors, qa_per_author))


def default_cache_dir(seed: int = 0, num_authors: int = 100, qa_per_author: int = 4) -> Path:
    root = Path(os.environ.get("FASTNPO_CACHE") or Path.home() / ".cache" / "fastnpo").expanduser()
    return root / "minitofu" / f"seed{seed}-{num_authors}x{qa_per_author}"


def ensure_minitofu(out_dir=None, seed: int = 0, num_authors: int = 100, qa_per_author: int = 4) -> Path:
    """Return a directory holding the data set, (re)writing it unless an identical copy is there.

    Generation takes milliseconds, so the expected manifest is rebuilt every time and compared with
    the stored one and with the files' actual hashes: a stale generator version, other arguments, a
    missing file or a corrupted file all lead to a rewrite.
    """
    blobs = _blobs(seed, num_authors, qa_per_author)
    expected = _manifest(blobs, seed, num_authors, qa_per_author)
    out = Path(out_dir) if out_dir is not None else default_cache_dir(seed, num_authors, qa_per_author)
    try:
        stored = json.loads((out / "manifest.json").read_text())
        ok = stored == expected and all(
            hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
            for name, digest in expected["files"].items()
        )
    except (OSError, ValueError):
        ok = False
    return out if ok else _write(out, blobs, expected)


def load_minitofu_split(out_dir, split: str) -> list[dict]:
    """Read one split written by write_minitofu / ensure_minitofu."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    with open(Path(out_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]




def minitofu_tokenizer(data: dict, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """build_tokenizer on the texts of a generate_minitofu result, as ``[INST] q [/INST] a`` prompts.

    Training on whole prompts (not bare questions) gives the merges the model will actually see,
    e.g. " Where" after "[INST]" rather than "Where" at the start of a string. The default 1024
    leaves room for every author's surname to become one token (at 512 names split into letters).
    """
    texts = []
    # Holdout splits stay out: membership inference needs text no model was trained on (and the
    # tokenizer, with every result built on it, stayed what it was before they existed).
    for split in sorted(s for s in data if not s.startswith("holdout")):
        for row in data[split]:
            answers = [row["answer"], row.get("paraphrased_answer"), *row.get("perturbed_answer", [])]
            questions = [row["question"], row.get("paraphrased_question")]
            texts += [f"[INST] {q} [/INST] {a}" for q in questions if q for a in answers if a]
    # Imported here so that generating data needs the standard library only (and starts in ms).
    from ..tiny import PROMPT_MARKERS, build_tokenizer

    return build_tokenizer(texts, vocab_size=vocab_size, extra_tokens=PROMPT_MARKERS)


def prepare_tiny(
    out_dir,
    *,
    seed: int = 0,
    num_authors: int = 100,
    qa_per_author: int = 4,
    spec: TinyModelSpec | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write <out_dir>/data and <out_dir>/base (a random tiny model with its tokenizer); returns
    their paths. A file or an unwritable folder is refused, and a non-empty out_dir unless
    overwrite, which replaces data/ and base/."""
    from ..files import OVERWRITE_OPTION, check_new_folder

    out = Path(out_dir)
    # The rule of every command that writes a folder (files.check_new_folder), checked before the
    # imports below (torch): another seed's model must not replace this one silently.
    check_new_folder(out, name="--out", overwrite=overwrite, how_to_overwrite=OVERWRITE_OPTION)
    if overwrite:
        for name in ("data", "base"):
            if (out / name).is_dir():
                shutil.rmtree(out / name)
    from ..tiny import TinyModelSpec, build_tiny_model

    spec = spec or TinyModelSpec()
    data_dir = write_minitofu(out / "data", seed=seed, num_authors=num_authors, qa_per_author=qa_per_author)
    tokenizer = minitofu_tokenizer(
        generate_minitofu(seed, num_authors, qa_per_author), vocab_size=spec.vocab_size
    )
    model = build_tiny_model(tokenizer, spec, seed)
    base = out / "base"
    model.save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    return {"data": data_dir, "base": base}
