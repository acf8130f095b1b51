"""Packaged corpora and tasks: text for perplexity and calibration, classification tasks for adapters.

Nothing here downloads: every source is installed once by ``adapterlab assets`` (see
:mod:`adapterlab.assets`); a missing one raises :class:`~adapterlab._paths.MissingAssetError`.

Corpora (plain text, one string per article, fixed held-out split by article):

* ``wiki``: the English Wikipedia XML sample shipped in gensim's test data (main-namespace
  articles; redirects and disambiguation pages dropped, wiki markup stripped by
  :func:`strip_wiki_markup`). Every 10th article (index 9, 19, ... in file order) is ``test``.
* ``lee``: the Lee news corpus (``lee_background.cor``, one article per line, exact duplicates
  dropped); every 10th article is ``test``.

Tasks (classification with a label-word verbaliser, so one accuracy function scores them all):

* ``sentiment``: Rotten Tomatoes sentences with mean human ratings (VADER ground truth);
  rows with ``|score| >= 0.5`` labelled by sign: `` negative`` / `` positive``.
* ``domain``: which source a sentence comes from: `` movie`` review, `` tweet``, `` product``
  review or `` news`` editorial (VADER ground truth, balanced).
* ``compare``: which of two generated numbers is larger: `` first`` / `` second``.

Train/test splits of every task are fixed and disjoint (a hash of the normalised text, or for
``compare`` a set difference), independent of ``seed``; ``seed`` only picks subsets.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import logging
import random
import re
import weakref
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adapterlab._named import Registry
from adapterlab.assets import gensim_file, vader_file

logger = logging.getLogger(__name__)

CORPORA = ("wiki", "lee")
SPLITS = ("train", "test")
#: Every ``TEST_EVERY``-th article (0-based index % TEST_EVERY == TEST_EVERY - 1) is held out.
TEST_EVERY = 10
ARTICLE_SEPARATOR = "\n\n"

Split = Literal["train", "test"]


def _check(kind: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of: {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------
# Wiki markup
# ----------------------------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_REF_PAIR = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.S | re.I)
_REF_SELF = re.compile(r"<ref\b[^>]*/>", re.I)
_DROP_ELEMENTS = re.compile(
    r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero|graph)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_HTML_TAGS = (
    "br|sup|sub|small|big|span|div|blockquote|center|nowiki|code|tt|s|u|i|b|em|strong|abbr|cite|"
    "poem|references|onlyinclude|includeonly|noinclude|p|font|ins|del|var|ref|li|ul|ol|dl|dt|dd|"
    "table|tr|td|th|hr|section|mapframe|pre|q|kbd|samp|wbr|bdi|mark|time|caption"
)
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?(?:" + _HTML_TAGS + r")\b[^<>]*>", re.I)
_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*(?:\s+([^\]]*))?\]")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.M)
_MAGIC = re.compile(r"__[A-Z]+__")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_TABLE_LINE = re.compile(r"^\s*(?:\{\||\|\}|\|-|\|\+|!|\|).*$", re.M)
_FILE_LINE = re.compile(r"^\s*(?:File|Image):.*$", re.M | re.I)
_LETTER = re.compile(r"[^\W\d_]")
_SPACES = re.compile(r"[ \t\u00a0]+")
_SPACE_PUNCT = re.compile(r" +([,.;:!?)])")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_MANY_NEWLINES = re.compile(r"\n{3,}")
#: Link namespaces that are dropped with their text (images, categories, interlanguage links).
_DROP_LINK_PREFIXES = {"file", "image", "category", "media"}
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)?$")
#: Trailing sections that are lists of citations or links, not prose.
_TAIL_SECTIONS = {
    "references", "external links", "further reading", "see also", "notes", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "references and notes",
}  # fmt: skip


def _remove_nested(text: str, opener: str, closer: str) -> str:
    """Remove every balanced ``opener ... closer`` span (nesting allowed).

    A stray closer is dropped; an opener never closed is dropped up to the end of its paragraph
    (the next blank line), which handles truncated articles without eating the rest of the text.
    """
    token = re.compile(re.escape(opener) + "|" + re.escape(closer))
    out: list[str] = []
    pos = 0
    while True:
        depth = 0
        seg_start = pos
        outer_open = -1
        for m in token.finditer(text, pos):
            if m.group() == opener:
                if depth == 0:
                    out.append(text[seg_start : m.start()])
                    outer_open = m.start()
                depth += 1
            elif depth == 0:  # stray closer
                out.append(text[seg_start : m.start()])
                seg_start = m.end()
            else:
                depth -= 1
                if depth == 0:
                    seg_start = m.end()
        if depth == 0:
            out.append(text[seg_start:])
            return "".join(out)
        # The opener at `outer_open` never closed: drop to the end of its paragraph, go on.
        end = text.find("\n\n", outer_open)
        if end < 0:
            return "".join(out)
        pos = end


def _link_text(match: re.Match[str]) -> str:
    target, _, rest = match.group(1).partition("|")
    target = target.strip()
    escaped = target.startswith(":")  # [[:Category:Foo]] is a plain link
    target = target.lstrip(":")
    ns = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if ns and not escaped and (ns in _DROP_LINK_PREFIXES or (_INTERLANGUAGE.match(ns) and not rest)):
        return ""  # images, categories, interlanguage links ([[de:Anarchismus]])
    if rest:
        return rest.split("|")[-1]
    return target


def strip_wiki_markup(text: str) -> str:
    """Turn MediaWiki source into plain prose.

    Removes comments, ``<ref>`` citations, templates ``{{...}}`` (nested), tables ``{|...|}``,
    image/category/interlanguage links and html tags; ``[[target|text]]`` becomes ``text``,
    ``[http://url text]`` becomes ``text``, ``'''bold'''``/``''italic''`` lose their quotes,
    ``== Heading ==`` becomes ``Heading`` on its own line, list markers are dropped, html entities
    are decoded. Trailing sections that are only references or links (References, External
    links, See also, ...) are dropped.
    """
    t = text.replace("\r\n", "\n")
    t = _COMMENT.sub("", t)
    t = _REF_SELF.sub("", t)
    t = _REF_PAIR.sub("", t)
    t = _DROP_ELEMENTS.sub("", t)
    t = _remove_nested(t, "{{", "}}")
    t = _remove_nested(t, "{|", "|}")
    t = _TABLE_LINE.sub("", t)  # rows of tables whose opener was lost
    t = _EXT_LINK.sub(lambda m: m.group(1) or "", t)
    for _ in range(8):  # innermost first: captions of [[File:..]] may hold links
        t, n = _INNER_LINK.subn(_link_text, t)
        if not n:
            break
    t = t.replace("[[", "").replace("]]", "")
    t = _BOLD_ITALIC.sub("", t)
    t = _BR.sub(" ", t)
    t = _TAG.sub("", t)
    t = html.unescape(t)
    t = _TAG.sub("", t)  # tags that were entity-escaped in the source
    t = _MAGIC.sub("", t)
    t = _HEADING.sub(lambda m: "\n" + m.group(2) + "\n", t)
    t = _LIST_MARK.sub("", t)
    t = _FILE_LINE.sub("", t)
    t = _EMPTY_PARENS.sub("", t)
    t = _SPACES.sub(" ", t)
    t = _SPACE_PUNCT.sub(r"\1", t)
    # Lines without a letter are leftovers of removed tables and templates.
    lines = [ln.strip() for ln in t.split("\n")]
    lines = [ln if _LETTER.search(ln) else "" for ln in lines]
    t = "\n".join(lines)
    t = _MANY_NEWLINES.sub("\n\n", t).strip()
    return _drop_tail_sections(t)


def _drop_tail_sections(text: str) -> str:
    paras = text.split("\n")
    for i, line in enumerate(paras):
        if line.strip().lower() in _TAIL_SECTIONS:
            return "\n".join(paras[:i]).strip()
    return text


_REDIRECT = re.compile(r"^\s*#\s*redirect\b", re.I)
_DISAMBIG = re.compile(r"\{\{\s*(?:disambig|disambiguation|dab|geodis|hndis|surname|given name)\b", re.I)
#: Articles shorter than this after cleaning (characters) are stubs or lists; dropped.
MIN_ARTICLE_CHARS = 500


def parse_wiki_dump(fileobj: Any) -> list[tuple[str, str]]:
    """``(title, clean_text)`` of the prose articles in a MediaWiki XML dump, in file order.

    Kept: namespace 0, not a redirect (``<redirect>`` element or ``#REDIRECT`` text), not a
    disambiguation page, at least :data:`MIN_ARTICLE_CHARS` characters after cleaning.
    """
    out: list[tuple[str, str]] = []
    for _, el in ET.iterparse(fileobj):
        if not el.tag.endswith("}page") and el.tag != "page":
            continue
        title = (el.findtext("{*}title") or "").strip()
        ns = (el.findtext("{*}ns") or "0").strip()
        redirect = el.find("{*}redirect") is not None
        raw = el.findtext("{*}revision/{*}text") or ""
        el.clear()
        if ns != "0" or redirect or _REDIRECT.match(raw):
            continue
        if title.endswith("(disambiguation)") or _DISAMBIG.search(raw):
            continue
        text = strip_wiki_markup(raw)
        if len(text) < MIN_ARTICLE_CHARS:
            continue
        out.append((title, text))
    return out


# ----------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------


@functools.cache
def _articles(name: str) -> tuple[tuple[str, str], ...]:
    """All ``(title, text)`` articles of a corpus, in file order."""
    _check("corpus", name, CORPORA)
    path = gensim_file(name)
    if name == "wiki":
        with bz2.open(path, "rb") as fh:
            arts = parse_wiki_dump(fh)
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
        arts = [(f"lee-{i}", ln.strip()) for i, ln in enumerate(lines) if ln.strip()]
    # Exact duplicates (the Lee file repeats 7 articles) would straddle the split: keep the first.
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for a in arts:
        if a[1] not in seen:
            seen.add(a[1])
            kept.append(a)
    arts = kept
    logger.debug("parsed %d %s articles from %s", len(arts), name, path.name)
    return tuple(arts)


def _is_test(index: int) -> bool:
    return index % TEST_EVERY == TEST_EVERY - 1


def corpus_articles(name: str, split: Split) -> list[tuple[str, str]]:
    """``(title, text)`` of one split of a corpus (see :func:`corpus_text`)."""
    _check("corpus", name, CORPORA)
    _check("split", split, SPLITS)
    want_test = split == "test"
    return [a for i, a in enumerate(_articles(name)) if _is_test(i) == want_test]


def corpus_text(name: str, split: Split) -> list[str]:
    """Cleaned articles of ``name`` (``"wiki"`` | ``"lee"``), ``split`` (``"train"`` | ``"test"``).

    The split is fixed by article: article ``i`` (file order) is test iff ``i % 10 == 9``.

    Raises:
        ValueError: unknown corpus or split.
        MissingAssetError: the data package is not installed.
    """
    return [text for _, text in corpus_articles(name, split)]


_ID_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], torch.Tensor]] = weakref.WeakKeyDictionary()


def corpus_ids(tokenizer: Any, corpus: str = "wiki", split: Split = "train") -> torch.Tensor:
    """1-D token ids of a split: its articles joined with ``"\\n\\n"``, no special tokens.

    Each article is tokenised on its own and the ids of the separator are put between them
    (identical to tokenising the joined text up to merges across the separator). Cached per
    tokenizer object.
    """
    _check("corpus", corpus, CORPORA)
    _check("split", split, SPLITS)
    try:
        cache = _ID_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    key = (corpus, split)
    if key not in cache:
        texts = corpus_text(corpus, split)
        sep = list(tokenizer(ARTICLE_SEPARATOR, add_special_tokens=False)["input_ids"])
        enc = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        ids: list[int] = []
        for i, art in enumerate(enc):
            if i:
                ids.extend(sep)
            ids.extend(art)
        cache[key] = torch.tensor(ids, dtype=torch.long)  # (n_tokens,)
    return cache[key].clone()


def eval_ids(tokenizer: Any, corpus: str = "wiki", split: Split = "test") -> torch.Tensor:
    """1-D ``LongTensor`` of the held-out text for windowed perplexity (see :func:`corpus_ids`)."""
    return corpus_ids(tokenizer, corpus, split)


def calibration_ids(
    tokenizer: Any,
    n_samples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    corpus: str = "wiki",
) -> torch.Tensor:
    """Random windows of the TRAIN split for calibration (Wanda, SparseGPT, ...).

    Window starts are drawn uniformly from the joined train token stream with
    ``torch.Generator().manual_seed(seed)``; the test split never appears.

    Returns:
        ``LongTensor`` of shape ``(n_samples, seqlen)``.

    Raises:
        ValueError: non-positive sizes, unknown corpus, or a train split shorter than ``seqlen``.
    """
    if n_samples <= 0 or seqlen <= 0:
        raise ValueError(f"n_samples and seqlen must be positive, got {n_samples} and {seqlen}")
    ids = corpus_ids(tokenizer, corpus, "train")  # (n_tokens,)
    if ids.numel() <= seqlen:
        raise ValueError(f"seqlen {seqlen} is longer than the {corpus!r} train split ({ids.numel()} tokens)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n_samples,), generator=g)  # (n_samples,)
    offsets = torch.arange(seqlen)  # (seqlen,)
    return ids[starts[:, None] + offsets[None, :]]  # (n_samples, seqlen)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One classification example: input ``text`` and the index of its answer in ``Task.choices``."""

    text: str
    label: int


@dataclass
class Task:
    """A classification task with a label-word verbaliser.

    ``prompt(text)`` is the model input; the answer is one of ``choices`` (strings with a leading
    space, appended right after the prompt). Accuracy = argmax over choices of the answer's
    log-likelihood.

    Attributes:
        name: registry key.
        description: one line, what the task is and where its data comes from.
        choices: answer strings, index = label.
        template: prompt template with a ``{text}`` field.
        source: where the rows come from (for reports).
    """

    name: str
    description: str
    choices: list[str]
    template: str
    source: str
    loader: Callable[[], tuple[list[Example], list[Example]]] = field(repr=False, compare=False, kw_only=True)
    _splits: tuple[list[Example], list[Example]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError(f"task {self.name!r}: template must contain '{{text}}'")
        if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
            raise ValueError(f"task {self.name!r}: needs at least two distinct choices")
        bad = [c for c in self.choices if not c.startswith(" ")]
        if bad:
            raise ValueError(f"task {self.name!r}: choices must start with a space, got {bad}")

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    def _all(self, split: str) -> list[Example]:
        _check("split", split, SPLITS)
        if self._splits is None:
            self._splits = self.loader()
        return self._splits[0] if split == "train" else self._splits[1]

    def examples(self, split: Split = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """Examples of the fixed ``split``; ``n=None`` gives all of it in its fixed order,
        otherwise ``n`` examples drawn without replacement by ``random.Random(seed)``.

        Raises:
            ValueError: unknown split, or ``n`` larger than the split.
        """
        rows = self._all(split)
        if n is None:
            return list(rows)
        if n < 0 or n > len(rows):
            raise ValueError(f"n={n} out of range for task {self.name!r} {split} ({len(rows)} examples)")
        idx = random.Random(seed).sample(range(len(rows)), n)
        return [rows[i] for i in idx]

    def format_train(self, example: Example) -> tuple[str, str]:
        """``(prompt, answer)`` for training: the answer is ``choices[label]``."""
        return self.prompt(example.text), self.choices[example.label]

    def size(self, split: Split) -> int:
        return len(self._all(split))


TASKS: Registry[Task] = Registry("task")


def register_task(task: Task) -> Task:
    return TASKS.register(task.name)(task)


def get_task(name: str) -> Task:
    """The registered task ``name``. Raises ValueError naming the choices when unknown."""
    return TASKS.get(name)


def task_names() -> list[str]:
    return TASKS.names()


def _text_hash(text: str, salt: str) -> int:
    norm = " ".join(text.lower().split())
    return int.from_bytes(hashlib.sha256((salt + norm).encode("utf-8")).digest()[:8], "big")


def _is_test_text(text: str, salt: str, test_fraction: float) -> bool:
    return _text_hash(text, salt) < int(test_fraction * 2**64)


@functools.cache
def read_vader(key: str) -> tuple[tuple[str, float, str], ...]:
    """Rows ``(id, score, text)`` of a VADER ground-truth file (CRLF, tab-separated).

    The text is html-unescaped (tweets hold ``&amp;``, a few editorials ``&amp;amp;``) and
    stripped; the file is UTF-8.
    """
    path = vader_file(key)
    rows = []
    for lineno, line in enumerate(path.read_bytes().decode("utf-8").split("\r\n"), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path.name}:{lineno}: expected 3 tab-separated fields, got {len(parts)}")
        text = html.unescape(parts[2])
        if "&" in text:  # a few editorial rows are escaped twice ("&amp;amp;")
            text = html.unescape(text)
        rows.append((parts[0].strip(), float(parts[1]), text.strip()))
    return tuple(rows)


def _dedup(rows: list[Example]) -> list[Example]:
    seen: set[str] = set()
    out = []
    for r in rows:
        key = " ".join(r.text.lower().split())
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


#: Ratings with ``|score|`` below this are neutral and left out of ``sentiment``.
SENTIMENT_MIN_ABS_SCORE = 0.5


def sentiment_rows() -> list[Example]:
    """All Rotten Tomatoes rows with ``|score| >= 0.5`` (label 1 = positive), file order."""
    return [
        Example(text, int(score > 0)) for _, score, text in read_vader("movie") if abs(score) >= SENTIMENT_MIN_ABS_SCORE
    ]


def _load_sentiment() -> tuple[list[Example], list[Example]]:
    rows = sentiment_rows()
    # Split by a hash of the normalised text, so duplicate sentences never straddle the split.
    train = [r for r in rows if not _is_test_text(r.text, "sentiment", 0.1)]
    test = _dedup([r for r in rows if _is_test_text(r.text, "sentiment", 0.1)])
    return train, test


DOMAIN_SOURCES = ("movie", "tweet", "product", "editorial")
DOMAIN_TEST_PER_CLASS = 250
#: Sentences shorter than this many words are too ambiguous to attribute.
DOMAIN_MIN_WORDS = 4


def _load_domain() -> tuple[list[Example], list[Example]]:
    per_class: list[list[Example]] = []
    for label, key in enumerate(DOMAIN_SOURCES):
        rows = [Example(t, label) for _, _, t in read_vader(key) if len(t.split()) >= DOMAIN_MIN_WORDS]
        per_class.append(_dedup(rows))
    # A text in two sources is ambiguous: drop it everywhere.
    counts: dict[str, int] = {}
    for rows in per_class:
        for r in rows:
            k = " ".join(r.text.lower().split())
            counts[k] = counts.get(k, 0) + 1
    per_class = [[r for r in rows if counts[" ".join(r.text.lower().split())] == 1] for rows in per_class]
    # Balance: every class gets the size of the smallest, rows ranked by a fixed text hash.
    n = min(len(rows) for rows in per_class)
    train: list[Example] = []
    test: list[Example] = []
    for rows in per_class:
        ranked = sorted(rows, key=lambda r: _text_hash(r.text, "domain"))[:n]
        test.extend(ranked[:DOMAIN_TEST_PER_CLASS])
        train.extend(ranked[DOMAIN_TEST_PER_CLASS:])
    # Interleave classes in a fixed order so a prefix is balanced too.
    train.sort(key=lambda r: _text_hash(r.text, "domain-order"))
    test.sort(key=lambda r: _text_hash(r.text, "domain-order"))
    return train, test


COMPARE_TRAIN = 5000
COMPARE_TEST = 1000


def _compare_pairs(rng: random.Random, n: int, exclude: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """``n`` distinct ordered pairs of distinct integers, half with equal digit counts."""
    pairs: list[tuple[int, int]] = []
    seen = set(exclude)
    while len(pairs) < n:
        da = rng.randint(1, 4)
        db = da if rng.random() < 0.5 else rng.randint(1, 4)
        a = rng.randint(10 ** (da - 1) if da > 1 else 0, 10**da - 1)
        b = rng.randint(10 ** (db - 1) if db > 1 else 0, 10**db - 1)
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        pairs.append((a, b))
    return pairs


def _load_compare() -> tuple[list[Example], list[Example]]:
    test_pairs = _compare_pairs(random.Random("compare-test"), COMPARE_TEST, set())
    train_pairs = _compare_pairs(random.Random("compare-train"), COMPARE_TRAIN, set(test_pairs))

    def ex(pairs: list[tuple[int, int]]) -> list[Example]:
        return [Example(f"{a} and {b}", int(b > a)) for a, b in pairs]

    return ex(train_pairs), ex(test_pairs)


register_task(
    Task(
        name="sentiment",
        description="Rotten Tomatoes sentence sentiment (VADER human ratings, |score| >= 0.5, sign)",
        choices=[" negative", " positive"],
        template="Review: {text}\nIs this review positive or negative? Answer:",
        source="vaderSentiment 3.3.2 sdist: movieReviewSnippets_GroundTruth.txt",
        loader=_load_sentiment,
    )
)
register_task(
    Task(
        name="domain",
        description="which source a sentence is from: movie review, tweet, product review, news editorial",
        choices=[" movie", " tweet", " product", " news"],
        template=(
            "Text: {text}\nIs this text from a movie review, a tweet, a product review or a news editorial? Answer:"
        ),
        source="vaderSentiment 3.3.2 sdist: the four *_GroundTruth.txt files (balanced)",
        loader=_load_domain,
    )
)
register_task(
    Task(
        name="compare",
        description="which of two generated integers (0-9999) is larger, the first or the second",
        choices=[" first", " second"],
        template="Numbers: {text}\nWhich number is larger, the first or the second? Answer:",
        source="generated by code (deterministic seeds; disjoint train/test pairs)",
        loader=_load_compare,
    )
)


# ----------------------------------------------------------------------------------------------
# Tokenisation for training
# ----------------------------------------------------------------------------------------------


def encode_pair(tokenizer: Any, prompt: str, answer: str, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of ``prompt + answer`` and how many of them belong to the prompt.

    The prompt is tokenised with the tokenizer's special tokens (a BOS where it adds one), the
    answer on its own without them, so the boundary is exact. When too long, the prompt loses
    tokens from its start (the question and the answer are kept).
    """
    p = list(tokenizer(prompt)["input_ids"])
    a = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if max_length is not None:
        if len(a) >= max_length:
            raise ValueError(f"max_length {max_length} leaves no room for the prompt (answer has {len(a)} tokens)")
        if len(p) + len(a) > max_length:
            p = p[len(p) + len(a) - max_length :]
    return p + a, len(p)


def tokenize_for_training(
    tokenizer: Any,
    task: Task | str,
    n: int | None = None,
    seed: int = 0,
    max_length: int = 256,
    *,
    split: Split = "train",
    return_tensors: Literal["pt"] | None = None,
) -> Any:
    """Tokenised ``(prompt, answer)`` examples where only the answer tokens are trained.

    Args:
        tokenizer: a Hugging Face tokenizer.
        task: a :class:`Task` or its name.
        n: number of examples (``None`` = the whole split), drawn by ``seed``.
        seed: which examples (see :meth:`Task.examples`).
        max_length: truncate longer sequences (the prompt loses its start).
        split: ``"train"`` (default) or ``"test"``.
        return_tensors: ``None`` gives a ``datasets.Dataset`` of unpadded lists (pad with
            ``transformers.DataCollatorForSeq2Seq``, which pads labels with -100); ``"pt"`` gives
            a dict of right-padded ``LongTensor`` s of shape ``(n, longest)``.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``; ``labels`` is -100 over the prompt
        (and padding) and equals ``input_ids`` over the answer.
    """
    if isinstance(task, str):
        task = get_task(task)
    if return_tensors not in (None, "pt"):
        raise ValueError(f"unknown return_tensors {return_tensors!r}; choose one of: None, pt")
    rows: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ex in task.examples(split, n=n, seed=seed):
        prompt, answer = task.format_train(ex)
        ids, n_prompt = encode_pair(tokenizer, prompt, answer, max_length)
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append([-100] * n_prompt + ids[n_prompt:])
    if return_tensors == "pt":
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        longest = max((len(r) for r in rows["input_ids"]), default=0)
        fill = {"input_ids": pad_id, "attention_mask": 0, "labels": -100}
        return {
            k: torch.tensor([r + [fill[k]] * (longest - len(r)) for r in v], dtype=torch.long)  # (n, longest)
            for k, v in rows.items()
        }
    import datasets

    return datasets.Dataset.from_dict(rows)
