"""adapterlab.data: wiki markup oracle, corpus splits, calibration windows, tasks, training labels."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch

from adapterlab import data
from adapterlab.data import Task, strip_wiki_markup

# ---------------------------------------------------------------------------------------------
# A tiny character-level tokenizer (no assets): same call conventions as a HF tokenizer.
# ---------------------------------------------------------------------------------------------


class CharTokenizer:
    """ids = code points (+3); optional BOS=1 when add_special_tokens; pad=0."""

    pad_token_id = 0

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos

    def _enc(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [ord(c) + 3 for c in text]
        return ([1] + ids) if (self.bos and add_special_tokens) else ids

    def __call__(self, text, add_special_tokens: bool = True, **kw):
        if isinstance(text, list):
            return {"input_ids": [self._enc(t, add_special_tokens) for t in text]}
        return {"input_ids": self._enc(text, add_special_tokens)}

    def decode(self, ids) -> str:
        return "".join(chr(int(i) - 3) for i in ids if int(i) >= 3)


# ---------------------------------------------------------------------------------------------
# Wiki markup (exact oracles on hand-written snippets)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src,expected",
    [
        ("'''Anarchism''' is a [[political philosophy]].", "Anarchism is a political philosophy."),
        ("See [[self-governance|self-governed]] ''societies''.", "See self-governed societies."),
        ("A{{cite web|url=x|title={{nested|deep}}}} B.", "A B."),
        ("Text.<ref name=a>Ref {{cite|x}} here</ref> More.<ref name=b/>", "Text. More."),
        ("X<!-- hidden [[link]] --> Y", "X Y"),
        ("[[File:A.jpg|thumb|A caption with [[a link]].]]Start.", "Start."),
        ("Body.\n[[Category:Political culture]]\n[[de:Anarchismus]]", "Body."),
        ("== History ==\nOld times.\n=== Early ===\nEarlier.", "History\n\nOld times.\n\nEarly\n\nEarlier."),
        ('Before.\n{| class="wikitable"\n|-\n! a !! b\n|-\n| 1 || 2\n|}\nAfter.', "Before.\n\nAfter."),
        ("Go [http://example.com the site] or [http://x.org].", "Go the site or."),
        ("5&nbsp;km &amp; more<br/>lines", "5 km & more lines"),
        ("* one\n* two\n# three", "one\ntwo\nthree"),
        ("An [[:Category:Foo|escaped]] link and [[wikt:anarchy|anarchy]].", "An escaped link and anarchy."),
        ("Ends {{unclosed template\n| x = 1\n\nNext paragraph.", "Ends\n\nNext paragraph."),
        ("Prose.\n\n== See also ==\n* [[Other]]\n\n== References ==\n{{reflist}}", "Prose."),
        ("Water (H<sub>2</sub>O) boils.", "Water (H2O) boils."),
        ("Name ({{IPAc-en|x}}) is.", "Name is."),
    ],
)
def test_strip_wiki_markup_oracle(src, expected):
    assert strip_wiki_markup(src) == expected


def _page(title: str, text: str, ns: int = 0, redirect: str | None = None) -> str:
    red = f'<redirect title="{redirect}" />' if redirect else ""
    esc = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
        f'<revision><id>2</id><text xml:space="preserve">{esc}</text></revision></page>'
    )


def test_parse_wiki_dump_drops_redirects_and_non_articles():
    body = "'''Real''' article about [[things]]. " * 30
    xml = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
        + _page("Real", body)
        + _page("Redirect1", "#REDIRECT [[Real]]", redirect="Real")
        + _page("Redirect2", "#redirect [[Real]]")  # no <redirect> element, text only
        + _page("Wikipedia:Thing", body, ns=4)
        + _page("Foo (disambiguation)", body)
        + _page("Stub", "Too short.")
        + _page("Second", body + "<ref>cite</ref>")
        + "</mediawiki>"
    )
    arts = data.parse_wiki_dump(io.BytesIO(xml.encode()))
    assert [t for t, _ in arts] == ["Real", "Second"]
    assert arts[0][1].startswith("Real article about things.")
    assert "cite" not in arts[1][1]


def test_split_rule():
    idx = [i for i in range(30) if data._is_test(i)]
    assert idx == [9, 19, 29]


def test_errors_name_value_and_choices():
    with pytest.raises(ValueError, match="'books'.*wiki, lee"):
        data.corpus_text("books", "train")
    with pytest.raises(ValueError, match="'valid'.*train, test"):
        data.corpus_text("wiki", "valid")
    with pytest.raises(ValueError, match="'nope'.*compare, domain, sentiment"):
        data.get_task("nope")
    with pytest.raises(ValueError, match="'dev'.*train, test"):
        data.get_task("compare").examples("dev")
    with pytest.raises(ValueError, match="'nope'"):
        data.eval_ids(CharTokenizer(), corpus="nope")
    with pytest.raises(ValueError, match="positive"):
        data.calibration_ids(CharTokenizer(), n_samples=0)


# ---------------------------------------------------------------------------------------------
# Tasks that need no assets: registry, compare, label-masked training tokens
# ---------------------------------------------------------------------------------------------


def test_registry_has_three_tasks_with_space_choices():
    assert data.task_names() == ["compare", "domain", "sentiment"]
    for name in data.task_names():
        task = data.get_task(name)
        assert all(c.startswith(" ") for c in task.choices)
        assert "{text}" not in task.prompt("x")
    assert data.get_task("sentiment").choices == [" negative", " positive"]


def test_task_validates():
    with pytest.raises(ValueError, match="space"):
        Task("t", "d", ["a", " b"], "{text}", "s", loader=lambda: ([], []))
    with pytest.raises(ValueError, match="text"):
        Task("t", "d", [" a", " b"], "no field", "s", loader=lambda: ([], []))


def test_compare_task_labels_and_split():
    task = data.get_task("compare")
    train, test = task.examples("train"), task.examples("test")
    assert (len(train), len(test)) == (data.COMPARE_TRAIN, data.COMPARE_TEST)
    assert not {e.text for e in train} & {e.text for e in test}
    for e in train[:500] + test:
        a, b = (int(x) for x in e.text.split(" and "))
        assert e.label == int(b > a) and a != b
    counts = Counter(e.label for e in test)
    assert min(counts.values()) > 0.4 * len(test)
    # Fixed splits, seeded subsets.
    assert task.examples("test") == test
    assert task.examples("train", n=50, seed=3) == task.examples("train", n=50, seed=3)
    assert task.examples("train", n=50, seed=3) != task.examples("train", n=50, seed=4)
    with pytest.raises(ValueError, match="out of range"):
        task.examples("test", n=len(test) + 1)


@pytest.mark.parametrize("bos", [False, True])
def test_tokenize_for_training_masks_exactly_the_prompt(bos):
    tok = CharTokenizer(bos=bos)
    task = data.get_task("compare")
    exs = task.examples("train", n=8, seed=0)
    ds = data.tokenize_for_training(tok, task, n=8, seed=0, max_length=256)
    assert set(ds.column_names) == {"input_ids", "attention_mask", "labels"}
    for ex, ids, mask, labels in zip(exs, ds["input_ids"], ds["attention_mask"], ds["labels"]):
        prompt, answer = task.format_train(ex)
        n_prompt = len(prompt) + int(bos)
        assert ids == tok(prompt)["input_ids"] + tok(answer, add_special_tokens=False)["input_ids"]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(labels[n_prompt:]) == answer
        assert mask == [1] * len(ids)


def test_tokenize_for_training_pt_padding_and_truncation():
    tok = CharTokenizer()
    task = data.get_task("compare")
    out = data.tokenize_for_training(tok, "compare", n=5, seed=1, max_length=20, return_tensors="pt")
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["input_ids"].dtype == torch.long and out["input_ids"].shape[1] <= 20
    for i, ex in enumerate(task.examples("train", n=5, seed=1)):
        answer = task.choices[ex.label]
        trained = out["labels"][i][out["labels"][i] != -100]
        assert tok.decode(trained.tolist()) == answer
        n = int(out["attention_mask"][i].sum())
        assert n == 20  # every prompt here is longer than 20 chars: truncated from the left
        assert tok.decode(out["input_ids"][i, :n].tolist()).endswith("Answer:" + answer)
    with pytest.raises(ValueError, match="return_tensors"):
        data.tokenize_for_training(tok, task, n=1, return_tensors="np")


# ---------------------------------------------------------------------------------------------
# Real corpora and tasks (need `adapterlab assets`)
# ---------------------------------------------------------------------------------------------


@pytest.mark.assets
def test_wiki_corpus_split_disjoint_and_clean():
    train, test = data.corpus_articles("wiki", "train"), data.corpus_articles("wiki", "test")
    assert len(train) > 80 and 8 <= len(test) <= 12
    assert not {t for t, _ in train} & {t for t, _ in test}
    titles = [t for t, _ in train + test]
    assert "Anarchism" in titles and "AccessibleComputing" not in titles  # a redirect
    assert not any(t.endswith("(disambiguation)") for t in titles)
    text = "\n".join(a for _, a in train + test)
    for junk in ("{{", "}}", "[[", "]]", "<ref", "'''", "#REDIRECT", "http://"):
        assert junk not in text, junk
    assert data.corpus_text("wiki", "test") == [a for _, a in test]


@pytest.mark.assets
def test_lee_corpus_split():
    train, test = data.corpus_text("lee", "train"), data.corpus_text("lee", "test")
    assert (len(train), len(test)) == (264, 29)  # 300 lines, 7 exact duplicates dropped
    assert not set(train) & set(test)


def _contains_window(stream: torch.Tensor, window: torch.Tensor) -> bool:
    starts = (stream[: stream.numel() - window.numel() + 1] == window[0]).nonzero().flatten()
    return any(torch.equal(stream[s : s + window.numel()], window) for s in starts.tolist())


@pytest.mark.assets
def test_eval_ids_only_test_articles():
    tok = CharTokenizer()
    ids = data.eval_ids(tok, corpus="lee")
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tok.decode(ids.tolist()) == "\n\n".join(data.corpus_text("lee", "test"))
    train_text = "\n\n".join(data.corpus_text("lee", "train"))
    for art in data.corpus_text("lee", "test"):
        assert art not in train_text


@pytest.mark.assets
def test_calibration_ids_shape_seed_and_train_only():
    tok = CharTokenizer()
    a = data.calibration_ids(tok, n_samples=6, seqlen=64, seed=0, corpus="lee")
    b = data.calibration_ids(tok, n_samples=6, seqlen=64, seed=0, corpus="lee")
    c = data.calibration_ids(tok, n_samples=6, seqlen=64, seed=1, corpus="lee")
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    train = data.corpus_ids(tok, "lee", "train")
    test = data.eval_ids(tok, corpus="lee")
    for w in torch.cat([a, c]):
        assert _contains_window(train, w)
        assert not _contains_window(test, w)
    with pytest.raises(ValueError, match="longer than"):
        data.calibration_ids(tok, n_samples=1, seqlen=10**8, corpus="lee")


@pytest.mark.assets
def test_sentiment_counts_and_split():
    rows = data.read_vader("movie")
    assert len(rows) == 10605
    expected = sum(abs(score) >= 0.5 for _, score, _ in rows)
    assert expected == 10072 == len(data.sentiment_rows())
    task = data.get_task("sentiment")
    train, test = task.examples("train"), task.examples("test")
    assert len(train) + len(test) == 10072 and len(test) >= 500
    assert not {e.text.lower() for e in train} & {e.text.lower() for e in test}
    for e in train[:200]:
        assert e.label in (0, 1)
    by_text = {text: score for _, score, text in rows}
    assert all((by_text[e.text] > 0) == bool(e.label) for e in test)


@pytest.mark.assets
def test_domain_balanced_and_disjoint():
    task = data.get_task("domain")
    train, test = task.examples("train"), task.examples("test")
    assert Counter(e.label for e in test) == {i: data.DOMAIN_TEST_PER_CLASS for i in range(4)}
    tc = Counter(e.label for e in train)
    assert len(set(tc.values())) == 1 and len(tc) == 4
    assert not {e.text for e in train} & {e.text for e in test}
    tweets = {t for _, _, t in data.read_vader("tweet")}
    assert all(e.text in tweets for e in test if e.label == 1)
    assert all("&amp;" not in e.text for e in train)


@pytest.mark.assets
def test_default_tokenizer_choices_are_single_tokens():
    from adapterlab.models import load_tokenizer

    tok = load_tokenizer()
    for name in data.task_names():
        for c in data.get_task(name).choices:
            assert len(tok(c, add_special_tokens=False)["input_ids"]) == 1, (name, c)
    ids = data.calibration_ids(tok, n_samples=2, seqlen=128)
    assert ids.shape == (2, 128)
