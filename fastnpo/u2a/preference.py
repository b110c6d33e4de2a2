"""Preference data for U2A: the J / candidate split and a bundled synthetic task whose right
answer is known, with its reward (loading is fastnpo.data.preference).

U2A needs three disjoint parts (``split_preference``): the J set (a small held-out preference
set whose DPO loss is the outer objective), an evaluation set (metrics nobody optimised on),
and the candidate negatives (the rejected responses of the remaining pairs; their chosen
responses are the retain set GradDiff may use).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data import encode_qa
from ..modeling import greedy_generate

__all__ = [
    "PreferenceSplit",
    "encode_pairs",
    "encode_responses",
    "greedy_reward",
    "split_preference",
    "synthetic_candidates",
    "synthetic_preference_task",
    "synthetic_reward",
    "tokenizer_for",
]


@dataclass
class PreferenceSplit:
    """j / eval: ``{"prompt", "chosen", "rejected"}`` pairs; candidates: ``{"prompt", "response",
    "kind"}`` negatives ("kind" is known only for the synthetic task, else "unknown"); retain:
    ``{"prompt", "response"}`` (GradDiff's retain set); sft: texts a from-scratch model must
    learn first (synthetic task only)."""

    j: list[dict]
    eval: list[dict]
    candidates: list[dict]
    retain: list[dict] = field(default_factory=list)
    sft: list[dict] = field(default_factory=list)

    def check(self) -> None:
        if not self.j:
            raise ValueError("the J set (held-out preference pairs for the outer DPO loss) is empty")
        if not self.candidates:
            raise ValueError("there are no candidate negatives to unlearn (candidates is empty)")


def split_preference(data, *, j_size: int, eval_size: int, max_candidates: int = 0, seed: int = 0) -> PreferenceSplit:
    """Shuffle (seeded), then the first j_size pairs are the J set, the next eval_size the
    evaluation set; the rest give the candidates (rejected) and the retain set (chosen)."""
    rows = list(data) if not isinstance(data, list) else data
    for name, value in (("j_size", j_size), ("eval_size", eval_size), ("max_candidates", max_candidates)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if j_size < 1:
        raise ValueError("j_size must be >= 1: U2A needs a J set (held-out preference pairs)")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order]
    rest = rows[j_size + eval_size :]
    if max_candidates:
        rest = rest[:max_candidates]
    split = PreferenceSplit(
        j=rows[:j_size],
        eval=rows[j_size : j_size + eval_size],
        candidates=[{"prompt": r["prompt"], "response": r["rejected"], "kind": "unknown"} for r in rest],
        retain=[{"prompt": r["prompt"], "response": r["chosen"]} for r in rest],
    )
    if len(split.j) < j_size or not split.candidates:
        raise ValueError(
            f"{len(rows)} pairs cannot give j_size={j_size}, eval_size={eval_size} and at least one candidate"
        )
    return split


# ------------------------------------------------------------------------------- tokenisation


def encode_responses(tokenizer, rows: list[dict], *, key: str, template: str, max_length: int) -> list[dict]:
    """Items for data.collate / SequenceLogprobModel: prompt through template, loss on rows[i][key]."""
    items = []
    for i, row in enumerate(rows):
        example = encode_qa(tokenizer, row["prompt"], row[key], template=template, max_length=max_length)
        items.append({"index": i, **example})
    return items


def encode_pairs(tokenizer, pairs: list[dict], *, template: str, max_length: int) -> tuple[list[dict], list[dict]]:
    """(chosen items, rejected items) of preference pairs, aligned by index."""
    return (
        encode_responses(tokenizer, pairs, key="chosen", template=template, max_length=max_length),
        encode_responses(tokenizer, pairs, key="rejected", template=template, max_length=max_length),
    )


# ------------------------------------------------------------------------------ synthetic task
#
# Chosen answers are polite ("good" style), rejected ones rude ("bad" style). Candidates are
#   bad:     rude answers to other prompts: unlearning them lowers the J set's rejected
#            log-probs (shared style), so J goes down;
#   decoy:   copies of the J set's CHOSEN answers filed as negatives (mislabelled data):
#            unlearning them lowers the chosen log-probs, so J goes up;
#   neutral: off-topic answers sharing neither style: little effect either way.
# The right selection is therefore the bad ones, and a reward (the style of a greedy answer)
# tells whether the model moved towards the preferred style.

_TOPICS = (
    "the river",
    "the garden",
    "the old bridge",
    "the lantern",
    "the harbor",
    "the orchard",
    "the market",
    "the library",
    "the mountain",
    "the meadow",
    "the lighthouse",
    "the village",
    "the forest",
    "the castle",
    "the desert",
    "the island",
    "the bakery",
    "the violin",
    "the comet",
    "the glacier",
    "the canyon",
    "the festival",
    "the windmill",
    "the train",
    "the museum",
    "the volcano",
    "the coral reef",
    "the clock",
    "the telescope",
    "the waterfall",
    "the chess club",
    "the greenhouse",
    "the kite",
    "the bicycle",
    "the lagoon",
    "the cathedral",
    "the quarry",
    "the vineyard",
    "the tram",
    "the observatory",
    "the marsh",
    "the pottery",
    "the fountain",
    "the archive",
    "the ferry",
    "the cliff",
    "the pond",
    "the stable",
    "the workshop",
    "the theater",
    "the beehive",
    "the valley",
    "the monastery",
    "the pier",
    "the bazaar",
    "the atelier",
    "the citadel",
    "the prairie",
    "the ravine",
    "the aqueduct",
    "the tundra",
    "the sawmill",
    "the dam",
    "the arcade",
    "the lodge",
    "the caravan",
    "the ballroom",
    "the pasture",
    "the fjord",
    "the oasis",
    "the plaza",
    "the tavern",
    "the belfry",
    "the dunes",
    "the grotto",
    "the steppe",
    "the savanna",
    "the gazebo",
    "the mill pond",
    "the boathouse",
    "the hedge maze",
    "the rookery",
    "the salt flats",
    "the sandbar",
    "the cloister",
    "the mesa",
    "the estuary",
    "the bell tower",
    "the terrace",
    "the orangery",
    "the ice rink",
    "the moor",
    "the delta",
    "the weir",
    "the causeway",
    "the rampart",
    "the crater",
    "the atoll",
    "the bayou",
    "the heath",
    "the spire",
    "the gallery",
    "the bastion",
    "the chapel",
    "the granary",
    "the kiln",
    "the loom",
    "the signal post",
    "the toll house",
    "the dovecote",
    "the crossroads",
    "the springs",
    "the tarn",
    "the glade",
    "the knoll",
    "the harbor wall",
    "the barn",
    "the foundry",
)
_QUESTIONS = ("Tell me about {t}.", "What do you think of {t}?", "Describe {t}.", "Can you explain {t}?")
_GOOD_OPEN = ("Gladly!", "Of course!", "Happy to help!", "Great question!")
_GOOD_ADJ = ("lovely", "peaceful", "fascinating", "beautiful", "charming", "wonderful")
_GOOD_CLOSE = ("I hope this helps.", "Feel free to ask more.", "Thank you for asking.")
_BAD_OPEN = ("Ugh.", "Whatever.", "Seriously?", "Not again.")
_BAD_ADJ = ("boring", "pointless", "stupid", "dull", "awful", "useless")
_BAD_CLOSE = ("Stop bothering me.", "Figure it out yourself.", "Go away.")
_NEUTRAL = (
    "Seven plus five is twelve.",
    "Blue and yellow make green.",
    "A week has seven days.",
    "Water boils at one hundred degrees.",
    "The alphabet starts with A.",
    "Ten minus four is six.",
)


def _good(rng: random.Random, topic: str) -> str:
    a, b = rng.sample(_GOOD_ADJ, 2)
    return f"{rng.choice(_GOOD_OPEN)} {topic.capitalize()} is {a} and {b}. {rng.choice(_GOOD_CLOSE)}"


def _bad(rng: random.Random, topic: str) -> str:
    a, b = rng.sample(_BAD_ADJ, 2)
    return f"{rng.choice(_BAD_OPEN)} {topic.capitalize()} is {a} and {b}. {rng.choice(_BAD_CLOSE)}"


def _neutral(rng: random.Random, topic: str) -> str:
    return f"{topic.capitalize()}? {' '.join(rng.sample(_NEUTRAL, 2))}"


def synthetic_preference_task(
    seed: int = 0,
    *,
    num_j: int = 24,
    num_eval: int = 24,
    num_bad: int = 32,
    num_decoy: int = 16,
    num_neutral: int = 16,
) -> PreferenceSplit:
    """The synthetic U2A task (see the comment above); deterministic for its arguments.

    Topics are disjoint between the J set, the evaluation set and the candidates, except that
    decoys reuse J pairs (that is what makes them decoys). sft = every text the base model
    should know before unlearning: both answers of the J pairs and of the candidates' prompts
    (the evaluation pairs stay unseen)."""
    counts = {
        "num_j": num_j,
        "num_eval": num_eval,
        "num_bad": num_bad,
        "num_decoy": num_decoy,
        "num_neutral": num_neutral,
    }
    for name, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if num_j < 1:
        raise ValueError("num_j must be >= 1: U2A needs a J set")
    if num_decoy > num_j:
        raise ValueError(f"num_decoy ({num_decoy}) must be <= num_j ({num_j}): decoys copy J pairs' chosen answers")
    need = num_j + num_eval + num_bad + num_neutral
    if need > len(_TOPICS):
        raise ValueError(f"the synthetic task has {len(_TOPICS)} topics; asked for {need}")
    rng = random.Random(f"u2a-synthetic-{seed}")
    topics = list(_TOPICS)
    rng.shuffle(topics)

    def pair(topic):
        return {
            "prompt": rng.choice(_QUESTIONS).format(t=topic),
            "chosen": _good(rng, topic),
            "rejected": _bad(rng, topic),
        }

    j = [pair(t) for t in topics[:num_j]]
    held = [pair(t) for t in topics[num_j : num_j + num_eval]]
    rest = topics[num_j + num_eval :]
    bad_pairs = [pair(t) for t in rest[:num_bad]]
    neutral_topics = rest[num_bad : num_bad + num_neutral]
    neutral_pairs = [pair(t) for t in neutral_topics]
    candidates = [{"prompt": p["prompt"], "response": p["rejected"], "kind": "bad"} for p in bad_pairs]
    candidates += [{"prompt": p["prompt"], "response": p["chosen"], "kind": "decoy"} for p in j[:num_decoy]]
    candidates += [
        {"prompt": p["prompt"], "response": _neutral(rng, t), "kind": "neutral"}
        for p, t in zip(neutral_pairs, neutral_topics, strict=True)
    ]
    retain = [{"prompt": p["prompt"], "response": p["chosen"]} for p in bad_pairs + neutral_pairs]
    sft = [{"prompt": p["prompt"], "response": p[k]} for p in j for k in ("chosen", "rejected")]
    sft += [{"prompt": c["prompt"], "response": c["response"]} for c in candidates if c["kind"] != "decoy"]
    sft += retain
    return PreferenceSplit(j=j, eval=held, candidates=candidates, retain=retain, sft=sft)


def synthetic_candidates(n: int, seed: int = 0) -> list[dict]:
    """n extra negatives in the synthetic task's styles (random topic, prompt and kind; a
    "decoy" here is merely a polite answer): a large candidate pool for benchmarks."""
    rng = random.Random(f"u2a-synthetic-candidates-{seed}")
    makers = {"bad": _bad, "decoy": _good, "neutral": _neutral}
    rows = []
    for _ in range(n):
        topic, kind = rng.choice(_TOPICS), rng.choice(tuple(makers))
        rows.append(
            {
                "prompt": rng.choice(_QUESTIONS).format(t=topic),
                "response": makers[kind](rng, topic),
                "kind": kind,
            }
        )
    return rows


def synthetic_reward(text: str) -> float:
    """+1 for a polite answer, -1 for a rude one, 0 for neither or both (word markers)."""
    words = {w.strip(".,!?").lower() for w in text.split()}
    good = bool(words & {w.lower() for w in (*_GOOD_ADJ, "gladly", "course", "happy", "hope", "thank")})
    bad = bool(words & {w.lower() for w in (*_BAD_ADJ, "ugh", "whatever", "seriously", "bothering", "away")})
    return float(good) - float(bad)


def greedy_reward(
    model, tokenizer, prompts, *, template: str, max_new_tokens: int, batch_size: int = 16
) -> tuple[float, list[str]]:
    """Mean synthetic_reward of the model's greedy answers to `prompts`, and the answers."""
    prompt_ids = [
        [tokenizer.bos_token_id, *tokenizer(template.format(question=p), add_special_tokens=False)["input_ids"]]
        for p in prompts
    ]
    answers = greedy_generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rewards = [synthetic_reward(a) for a in answers]
    return (sum(rewards) / len(rewards) if rewards else float("nan")), answers


# ------------------------------------------------------------ a from-scratch model for the task


def tokenizer_for(split: PreferenceSplit, *, template: str, vocab_size: int):
    """A byte-level BPE trained on every prompt + response of the split (milliseconds)."""
    from ..tiny import PROMPT_MARKERS, build_tokenizer

    rows = split.j + split.eval + split.candidates + split.retain
    texts = [
        f"{template.format(question=r['prompt'])} {r[key]}"
        for r in rows
        for key in ("chosen", "rejected", "response")
        if r.get(key)
    ]
    return build_tokenizer(texts, vocab_size=vocab_size, extra_tokens=PROMPT_MARKERS)
