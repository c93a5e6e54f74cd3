"""The training corpus builder (lowbit.train.corpus) on small fake packages: text extraction, the document split,
token files that decode back to the text, the cached rebuild, `lowbit train --data CORPUS`, and failures."""
from __future__ import annotations

import gzip
import json
import subprocess

import pytest
import torch
from typer.testing import CliRunner

from lowbit.cli import app
from lowbit.train import corpus
from lowbit.train.corpus import CorpusError, Source, build, documents, html_text, is_heldout, load

PROSE = ("The quick brown fox jumps over the lazy dog while the compiler checks every line of the program. "
         "Documentation explains how each option changes what the tool does, and why. ") * 4

PAGE = """<html><head><title>T</title><style>p {color: red}</style><script>var x = 1;</script></head>
<body><div class="sphinxsidebar"><p>Navigation junk</p><div>nested junk</div></div>
<h1>Title &amp; more</h1><p>First   paragraph
 spans lines.</p><pre>code  keeps   spaces
second line</pre><p>After.</p></body></html>"""


def test_html_text_keeps_visible_text_and_drops_navigation_scripts_and_styles():
    text = html_text(PAGE)
    assert text.splitlines()[0] == "Title & more"
    assert "First paragraph spans lines." in text
    assert "code  keeps   spaces\nsecond line" in text  # <pre> keeps its spacing and lines
    assert "After." in text
    for junk in ("Navigation", "nested junk", "color", "var x", "T\n"):
        assert junk not in text


def fake_package(cache, name: str, files: dict[str, str]):
    root = cache / "packages" / name
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".gz"):
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_text(text)
    (root / ".unpacked").write_text(f"{name}_1.0_all.deb")
    return root


def sources_and_cache(tmp_path):
    cache = tmp_path / "cache"
    docs = {f"usr/share/doc/a/Documentation/part{i}.rst.gz": f"Document {i}. " + PROSE for i in range(60)}
    docs["usr/share/doc/a/Documentation/translations/x.rst.gz"] = "Übersetzung " + PROSE
    docs["usr/share/doc/a/Documentation/short.rst.gz"] = "too short"
    fake_package(cache, "pkg-a", docs)
    fake_package(cache, "pkg-b", {f"usr/share/doc/b/html/page{i}.html": PAGE.replace("After.", PROSE + f"(page {i}).")
                                  for i in range(30)})
    sources = (Source("pkg-a", "GPL-2.0", ("*/Documentation/*.rst.gz",), ("*/translations/*",)),
               Source("pkg-b", "MIT", ("*/html/*.html",)))
    return sources, cache


def test_documents_follow_the_include_and_exclude_patterns(tmp_path):
    sources, cache = sources_and_cache(tmp_path)
    got = dict(documents(sources[0], cache / "packages" / "pkg-a"))
    assert len(got) == 60  # the translation is excluded, the 9-character stub dropped
    assert all("translations" not in rel for rel in got)
    assert got["/usr/share/doc/a/Documentation/part7.rst.gz"] == ("Document 7. " + PROSE).strip()


def test_the_heldout_split_is_by_document_and_stable():
    names = [f"pkg:/doc/{i}.html" for i in range(2000)]
    held = [n for n in names if is_heldout(n, 50)]
    assert 20 <= len(held) <= 60  # about one in 50
    assert held == [n for n in names if is_heldout(n, 50)]  # the same split every time


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("corpus")
    sources, cache = sources_and_cache(tmp)

    def no_network(*args, **kwargs):
        raise AssertionError(f"an unpacked package was fetched again: {args}")

    meta = build(tmp / "out", cache, vocab=300, heldout_every=5, sources=sources, progress=False, run=no_network)
    return tmp / "out", meta, sources, cache


def test_token_files_decode_to_the_documents_and_the_split_holds(built):
    out, meta, sources, cache = built
    tok, train, held = load(out)
    assert train.dtype == torch.uint16 and meta["train_tokens"] == train.numel()
    assert meta["heldout_tokens"] == held.numel() > 0
    assert [r["license"] for r in meta["sources"]] == ["GPL-2.0", "MIT"]
    train_text = tok.decode(train.long().tolist())
    held_text = tok.decode(held.long().tolist())
    for source in sources:
        for rel, text in documents(source, cache / "packages" / source.package):
            inside_train, inside_held = text in train_text, text in held_text
            assert inside_train != inside_held, rel  # every document is in exactly one part
            assert inside_held == is_heldout(f"{source.package}:{rel}", 5)
    eos = tok.eos_token_id
    assert int((train.long() == eos).sum()) == sum(r["documents"] - r["heldout_documents"] for r in meta["sources"])


def test_a_finished_build_is_returned_without_work_and_new_settings_rebuild(built, tmp_path):
    out, meta, sources, cache = built
    stamp = (out / "train.bin").stat().st_mtime_ns
    assert build(out, cache, vocab=300, heldout_every=5, sources=sources, progress=False) == meta
    assert (out / "train.bin").stat().st_mtime_ns == stamp
    copy = tmp_path / "again"
    again = build(copy, cache, vocab=280, heldout_every=5, sources=sources, progress=False)
    assert again["vocab"] == 280 and again["settings"] != meta["settings"]


def test_an_interrupted_rebuild_leaves_no_corpus_to_read(built, tmp_path, monkeypatch):
    out, meta, sources, cache = built
    copy = tmp_path / "c"
    build(copy, cache, vocab=300, heldout_every=5, sources=sources, progress=False)
    assert corpus.is_corpus(copy)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("lowbit.train.tokenizer.train_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(copy, cache, vocab=290, heldout_every=5, sources=sources, progress=False)
    assert not corpus.is_corpus(copy)  # the old corpus.json went first: nothing half-built passes for a corpus
    with pytest.raises(CorpusError, match="vocab must be in 257..65536"):
        build(copy, cache, vocab=100, sources=sources, progress=False)
    with pytest.raises(CorpusError, match="heldout_every must be >= 2"):
        build(copy, cache, heldout_every=1, sources=sources, progress=False)


def test_lowbit_train_takes_a_corpus_folder(built, tmp_path):
    out, meta, _, _ = built
    result = CliRunner().invoke(app, ["train", "--data", str(out), "--size", "tiny", "--bits", "32", "--steps", "3",
                                      "--batch", "2", "--seq", "32", "--eval-every", "3", "--save-every", "3",
                                      "--threads", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["vocab"] == meta["vocab"] and summary["train_tokens"] == meta["train_tokens"]
    assert summary["heldout_tokens"] == meta["heldout_tokens"]
    result = CliRunner().invoke(app, ["train", "--data", str(out), "--data", str(out), "--out", str(tmp_path / "n")])
    assert result.exit_code != 0 and "used alone" in result.output
    # the same --out on other data is refused, not resumed with another tokenizer's ids
    other = tmp_path / "other.txt"
    other.write_text(PROSE * 40)
    result = CliRunner().invoke(app, ["train", "--data", str(other), "--size", "tiny", "--bits", "32", "--steps", "4",
                                      "--batch", "2", "--seq", "32", "--vocab", "300", "--eval-every", "3",
                                      "--save-every", "3", "--threads", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "trained on other data" in result.output, result.output


def test_lowbit_train_takes_several_text_files(tmp_path):
    files = []
    for i in range(2):
        files += ["--data", str(tmp_path / f"t{i}.txt")]
        (tmp_path / f"t{i}.txt").write_text((f"Text {i}. " + PROSE) * 20)
    result = CliRunner().invoke(app, ["train", *files, "--size", "tiny", "--bits", "32", "--steps", "2", "--batch",
                                      "2", "--seq", "32", "--vocab", "300", "--eval-every", "2", "--save-every", "2",
                                      "--threads", "1", "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "not found" in result.output
    (tmp_path / "folder").mkdir()
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "neither a text file nor a built corpus" in result.output


def test_a_package_that_cannot_be_fetched_is_named(tmp_path):
    def failing(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package no-such-doc")

    with pytest.raises(CorpusError, match="no-such-doc: apt-get download failed: E: Unable to locate"):
        corpus.unpack(Source("no-such-doc", "MIT", ("*",)), tmp_path, run=failing)
    with pytest.raises(CorpusError, match="not a built corpus"):
        load(tmp_path)
