"""RULER's synthetic long-context tasks, generated here: offline, deterministic, sized in SmolLM2 tokens.

Hsieh et al., *RULER: What's the Real Context Size of Your Long-Context Language Models?*
(COLM 2024, arXiv 2404.06654). The generators follow NVIDIA/RULER as lm-eval 0.4.13 vendors
it (``lm_eval/tasks/ruler/``: ``prepare_niah.py``, ``vt_utils.py``, ``cwe_utils.py``,
``fwe_utils.py``): the same templates, needles, answer prefixes, word lists (PyPI
``wonderwords``) and answer lengths. What differs, and why:

- **Haystack.** RULER's "essay" haystack is Paul Graham's essays, which lm-eval downloads
  from the hub. Here it is the WikiText-2 test articles that ``python -m alisa.data prepare``
  already holds (``<data_dir>/wikitext/test.jsonl``, verified against the data folder's
  manifest): detokenised with lm-eval's own WikiText detokeniser, headings dropped, split
  into sentences at ``. ! ?``. Real prose keeps attention-score policies honest (RULER's
  repeated "noise" sentences make attention periodic; the passkey task already covers that
  case). Each document starts at its own seeded sentence, where RULER starts every document
  at the first essay. Variable tracking keeps RULER's noise haystack, as RULER does.
- **Seeding.** Every document draws from its own ``random.Random`` seeded by (task, length,
  index): lm-eval's variable tracking and frequent words use the unseeded global
  generators (another document set on every run). A document does not depend on the others,
  so ``limit`` takes a stable prefix.
- **Length.** Counted with the embedded SmolLM2-135M tokenizer (``alisa.load_model
  ("smollm2-135m")``'s), whatever model is scored, so every model and policy sees the same
  documents. A document fills its target: the largest haystack whose prompt (input, a space
  and the answer prefix) plus the task's answer budget fits, found by bisection on exact
  token counts. ``length`` is that prompt's tokens plus the budget, as RULER records it.

Tasks (``KINDS``), each at 1k, 2k and 4k tokens (``LENGTHS``), ``DOCS`` documents:

==================  ============================================================  ==============
kind                what (RULER name)                                             answer (RULER)
==================  ============================================================  ==============
niah_single         one key -> one 7-digit number in WikiText (niah_single_2)     32 (128)
niah_multikey       four keys, one asked for (niah_multikey_1)                    32 (128)
niah_multivalue     one key with four numbers, all asked for (niah_multivalue)    64 (128)
niah_multiquery     four keys, all four asked for (niah_multiquery)               64 (128)
vt                  a chain of 4 variable hops in noise, with one worked example  30 (30)
cwe                 the 10 most common words of a numbered list, one example      80 (120)
fwe                 the 3 most frequent coded words of a Zipf(2) text             32 (50)
==================  ============================================================  ==============

The answer budget (``KINDS``, tokens) is the generation limit and the room a document leaves
for it; RULER's is larger because chat models restate the question first (see ``KINDS``).

The metric is RULER's string match (``string_match_all``): the fraction of the expected
strings found in the generation, case-insensitive.
"""

from __future__ import annotations

import functools
import math
import random
import re
import string
from collections.abc import Callable
from typing import Any

LENGTHS = {"1k": 1024, "2k": 2048, "4k": 4096}  # target tokens (prompt + answer budget)
DOCS = 50  # documents per (kind, length), as the passkey task has
SEED = 42  # RULER's RANDOM_SEED; each document's generator is seeded with (SEED, kind, length, index)

# (keys, values per key, keys asked) of the needle tasks.
NIAH = {
    "niah_single": (1, 1, 1),
    "niah_multikey": (4, 1, 1),
    "niah_multivalue": (1, 4, 1),
    "niah_multiquery": (4, 1, 4),
}
# Answer budget in tokens (max_gen_toks, and the room each document leaves for it): about twice the longest
# expected answer in SmolLM2 tokens (9, 9, 37, 37, 20, 53, 17 measured over the 1k and 4k documents), where
# RULER gives 128 / 30 / 120 / 50 for chatty models. Generation is what a CPU pays for: a rambling answer
# would cost up to 4x the tokens and change no string match.
KINDS = {"niah_single": 32, "niah_multikey": 32, "niah_multivalue": 64, "niah_multiquery": 64, "vt": 30, "cwe": 80,
         "fwe": 32}

NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special magic "
                 "{type_needle_v} for {query} mentioned in the provided text?")
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER's np.round(np.linspace(0, 100, 40)), same half-to-even rounding

VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
               "Question: Find all variables that are assigned the value {query} in the text above.")
# (RULER's typo "assgined" kept: the prompt is RULER's)
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
             "assgined the value {query}, they are:")
VT_HOPS = 4

CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
                "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?")
CWE_PREFIX = "Answer: The top 10 words that appear most often in the list are:"
CWE_COMMON = 10

FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore "
                "the dots '....'. What are the three most frequently appeared words in the above coded text?")
FWE_PREFIX = "Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_ALPHA = 2.0
FWE_ZETA = math.pi ** 2 / 6  # zeta(FWE_ALPHA)
FWE_WORDLEN = 6

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")


class RulerError(ValueError):
    """A task name, length or document count that does not exist (one line, naming what is allowed)."""


# --------------------------------------------------------------------------- shared inputs


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The embedded SmolLM2-135M tokenizer (the model's own cache folder; built once, see alisa.models)."""
    from transformers import AutoTokenizer

    from .models import _embedded_folder

    return AutoTokenizer.from_pretrained(_embedded_folder())


def count_tokens(text: str) -> int:
    return len(tokenizer()(text).input_ids)


@functools.lru_cache(maxsize=1)
def words() -> tuple[str, ...]:
    """wonderwords' nouns, adjectives and verbs, sorted (RULER's CWE word list, before its shuffle; here without
    the few entries that hold a space, so that a numbered list reads unambiguously)."""
    from wonderwords import RandomWord

    r = RandomWord()
    return tuple(sorted(set(r.filter(include_categories=["noun", "adjective", "verb"], exclude_with_spaces=True))))


@functools.lru_cache(maxsize=1)
def _key_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(adjectives, nouns) whose pairs ``adj-noun`` are RULER's word keys."""
    from wonderwords import RandomWord

    r = RandomWord()
    return tuple(tuple(sorted(set(r.filter(include_categories=[c], exclude_with_spaces=True)))) for c in ("adjective", "noun"))


@functools.lru_cache(maxsize=4)
def essay_sentences(folder: str | None = None) -> tuple[str, ...]:
    """The WikiText-2 test articles of the prepared data folder as prose sentences (headings dropped).

    Raises ``alisa.data.DataNotPrepared`` (one line) when the folder is not prepared.
    """
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    from . import data

    out: list[str] = []
    for row in data.load_rows("wikitext", "test", folder):
        for line in wikitext_detokenizer(row).split("\n"):
            line = line.strip()
            if not line or line.startswith("="):
                continue
            out += [s.strip() for s in _SENTENCE_END.split(line) if len(s.split()) >= 3]
    if len(out) < 1000:
        raise data.DataError(f"data file {data.split_path('wikitext', 'test', folder)} holds {len(out)} sentences: "
                             f"expected the WikiText-2 test set: {data.PREPARE_HINT} again")
    return tuple(out)


def _rng(kind: str, length: int, index: int, *more) -> random.Random:
    return random.Random("/".join(map(str, ("alisa-ruler", SEED, kind, length, index, *more))))


def _fit(build: Callable[[int], str], budget: int, guess: int, least: int = 1) -> tuple[int, str, int]:
    """The largest ``n >= least`` whose ``build(n)`` has at most ``budget`` tokens: (n, text, tokens).

    Token counts grow with ``n``; exact counts, bracketed from ``guess`` then bisected.
    """
    seen: dict[int, tuple[str, int]] = {}

    def size(n: int) -> int:
        if n not in seen:
            text = build(n)
            seen[n] = (text, count_tokens(text))
        return seen[n][1]

    n = max(least, guess)
    step = max(1, n // 16)
    if size(n) <= budget:
        lo, hi = n, n + step
        while size(hi) <= budget:
            lo, hi, step = hi, hi + step, step * 2
    else:
        hi, lo = n, max(least, n - step)
        while size(lo) > budget:
            if lo == least:
                raise RulerError(f"even the smallest haystack ({least}) takes {size(lo)} tokens: more than the "
                                 f"{budget} a document may have")
            hi, lo, step = lo, max(least, lo - step), step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if size(mid) <= budget else (lo, mid)
    return lo, *seen[lo]


def _doc(index: int, prompt: str, tokens: int, prefix: str, outputs: list[str], max_length: int, kind: str,
         **extra) -> dict:
    """A document in lm-eval's RULER format; ``prompt`` is the input, a space and ``prefix`` (``tokens`` long)."""
    text = prompt[: -len(prefix) - 1]
    for o in outputs:
        if o not in text:
            raise RuntimeError(f"answer {o!r} is not in the generated input (index {index}): a generator bug")
    return {"index": index, "input": text, "outputs": outputs, "gen_prefix": prefix, "length": tokens + KINDS[kind],
            "max_length": max_length, **extra}


# --------------------------------------------------------------------------- generators


def niah(kind: str, max_length: int, index: int, folder: str | None = None) -> dict[str, Any]:
    """A needle-in-a-haystack document (RULER ``prepare_niah.generate_input_output``, essay haystack)."""
    n_keys, n_values, n_queries = NIAH[kind]
    rng = _rng(kind, max_length, index)
    adjs, nouns = _key_parts()
    keys: list[str] = []
    while len(keys) < n_keys:
        k = f"{rng.choice(adjs)}-{rng.choice(nouns)}"
        if k not in keys:
            keys.append(k)
    values = [[str(rng.randint(10 ** 6, 10 ** 7 - 1)) for _ in range(n_values)] for _ in keys]
    needles = [NEEDLE.format(type_needle_v="numbers", key=k, value=v) for k, vs in zip(keys, values) for v in vs]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))  # needles[i] goes to the i-th shallowest depth
    asked = rng.sample(range(n_keys), n_queries)
    queries = [keys[i] for i in asked]
    outputs = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, type_v = NIAH_TEMPLATE, "numbers"
    if n_queries * n_values == 1:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        type_v = "number"
        prefix = f"The special magic number for {query} mentioned in the provided text is"
    else:
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
    sentences = essay_sentences(folder)
    start = rng.randrange(len(sentences))

    def build(n: int) -> str:
        hay = [sentences[(start + i) % len(sentences)] for i in range(n)]
        parts, prev = [], 0
        for d, needle in zip(depths, needles):
            at = int(n * d / 100)
            parts += hay[prev:at] + [needle]
            prev = at
        parts += hay[prev:]
        return template.format(type_needle_v=type_v, context=" ".join(parts), query=query) + " " + prefix

    budget = max_length - KINDS[kind]
    _, prompt, tokens = _fit(build, budget, guess=budget // 30)
    return _doc(index, prompt, tokens, prefix, outputs, max_length, kind, depths=depths)


def _vt_text(rng: random.Random, n_noise: int, chain: list[str], value: str, n_vars: int) -> tuple[str, str]:
    """(question part, answer prefix) of a variable-tracking prompt: the chain at random places in noise."""
    sentences = [VT_NOISE] * n_noise
    for j, p in enumerate(sorted(rng.sample(range(n_noise), len(chain)))):
        sentences.insert(p + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    return VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num_v=n_vars, query=value)


def _vt_chain(rng: random.Random, letters: int) -> tuple[list[str], list[str], str]:
    """(variable names, assignment statements, value) of one chain of VT_HOPS hops."""
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if v not in names:
            names.append(v)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(VT_HOPS)]
    return names, chain, value


def vt(max_length: int, index: int, folder: str | None = None) -> dict[str, Any]:
    """Variable tracking (RULER ``vt_utils``): one chain, 4 hops, noise haystack, after one worked example
    (3-letter names, sized to 500 tokens, as RULER's in-context example)."""
    rng = _rng("vt", max_length, index)
    ex_names, ex_chain, ex_value = _vt_chain(rng, 3)
    names, chain, value = _vt_chain(rng, 5)
    seed = rng.random()

    def example(n: int) -> str:
        q, p = _vt_text(random.Random(f"{seed}/example/{n}"), n, ex_chain, ex_value, VT_HOPS + 1)
        return f"{q} {p} {' '.join(ex_names)}"

    _, shot, _ = _fit(example, 500 - KINDS["vt"], guess=15, least=len(ex_chain))

    def build(n: int) -> str:
        q, p = _vt_text(random.Random(f"{seed}/{n}"), n, chain, value, VT_HOPS + 1)
        return f"{shot}\n\n{q} {p}"

    budget = max_length - KINDS["vt"]
    _, prompt, tokens = _fit(build, budget, guess=budget // 25, least=len(chain))
    return _doc(index, prompt, tokens, VT_PREFIX.format(num_v=VT_HOPS + 1, query=value), names, max_length, "vt")


def _cwe_list(rng: random.Random, pool: list[str], common: int, uncommon: int) -> tuple[str, list[str]]:
    """A numbered list of ``pool``: its first CWE_COMMON words ``common`` times, the rest ``uncommon`` times."""
    top, rest = pool[:CWE_COMMON], pool[CWE_COMMON:]
    items = top * common + rest * uncommon
    rng.shuffle(items)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), top


def cwe(max_length: int, index: int, folder: str | None = None) -> dict[str, Any]:
    """Common words extraction (RULER ``cwe_utils``), with RULER's one worked example before the list.

    Below 4k tokens the common words appear 6 times and the others once (example: 20 words,
    3 and 1); from 4k, 30 and 3 (example: 40 words, 10 and 3), as in RULER.
    """
    rng = _rng("cwe", max_length, index)
    pool = list(words())
    rng.shuffle(pool)
    small = max_length < 4096
    ex_n, ex_common, ex_uncommon = (20, 3, 1) if small else (40, 10, 3)
    common, uncommon = (6, 1) if small else (30, 3)
    ex_words, pool = pool[-ex_n:], pool[:-ex_n]
    seed = rng.random()
    ex_list, ex_top = _cwe_list(random.Random(f"{seed}/example"), ex_words, ex_common, ex_uncommon)
    shot = (CWE_TEMPLATE.format(context=ex_list) + " " + CWE_PREFIX + " "
            + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_top)))

    def build(n: int) -> str:
        lst, _ = _cwe_list(random.Random(f"{seed}/{n}"), pool[:n], common, uncommon)
        return f"{shot}\n{CWE_TEMPLATE.format(context=lst)} {CWE_PREFIX}"

    budget = max_length - KINDS["cwe"]
    _, prompt, tokens = _fit(build, budget, guess=budget // 8, least=CWE_COMMON + 1)
    return _doc(index, prompt, tokens, CWE_PREFIX, pool[:CWE_COMMON], max_length, "cwe")


def fwe(max_length: int, index: int, folder: str | None = None) -> dict[str, Any]:
    """Frequent words extraction (RULER ``fwe_utils``): max_length // 50 random 6-letter words, the k-th most
    frequent appearing ``n / (k^2 zeta(2))`` times; the most frequent is "..." (noise), the answer the next three."""
    rng = _rng("fwe", max_length, index)
    size = max_length // 50
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=FWE_WORDLEN)))
    ordered = sorted(vocab)
    rng.shuffle(ordered)
    ordered[0] = "..."
    seed = rng.random()

    def build(n: int) -> str:
        counts = [int(n * k ** -FWE_ALPHA / FWE_ZETA) for k in range(1, size + 1)]
        text = [w for w, c in zip(ordered, counts) for _ in range(c)]
        random.Random(f"{seed}/{n}").shuffle(text)
        return f"{FWE_TEMPLATE.format(context=' '.join(text))} {FWE_PREFIX}"

    budget = max_length - KINDS["fwe"]
    # n must give the 4th word at least one copy less than the 3rd (an unambiguous top 3)
    _, prompt, tokens = _fit(build, budget, guess=budget // 2, least=200)
    return _doc(index, prompt, tokens, FWE_PREFIX, ordered[1:4], max_length, "fwe")


# --------------------------------------------------------------------------- documents


def document(kind: str, length: str, index: int, folder: str | None = None) -> dict[str, Any]:
    """Document ``index`` of task ``kind`` at ``length`` ('1k', '2k', '4k')."""
    if kind not in KINDS:
        raise RulerError(f"unknown RULER task {kind!r}: allowed are {', '.join(KINDS)}")
    if length not in LENGTHS:
        raise RulerError(f"unknown RULER length {length!r}: allowed are {', '.join(LENGTHS)}")
    n = LENGTHS[length]
    if kind in NIAH:
        return niah(kind, n, index, folder)
    return {"vt": vt, "cwe": cwe, "fwe": fwe}[kind](n, index, folder)


@functools.lru_cache(maxsize=32)
def _documents(kind: str, length: str, n_docs: int, folder: str | None) -> tuple[dict, ...]:
    return tuple(document(kind, length, i, folder) for i in range(n_docs))


def documents(kind: str, length: str, n_docs: int = DOCS, folder: str | None = None) -> list[dict[str, Any]]:
    """The first ``n_docs`` documents of a task (generated once per process; copies returned)."""
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise RulerError(f"n_docs={n_docs!r} is invalid: allowed is an integer >= 1")
    from .data import data_dir

    return [dict(d) for d in _documents(kind, length, n_docs, str(data_dir(folder)))]
