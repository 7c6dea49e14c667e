"""LLMLingua compression: the real SmolLM2 path, and LLMLingua-2 on a tiny random head.

The original LLMLingua runs on the embedded SmolLM2-135M-Instruct (converted
once into the chatfleet cache by `ensure_embedded_model`): it really compresses,
so the achieved ratio is checked against the requested one. No LLMLingua-2
model installs from a registry, so its mechanics run on a tiny randomly
initialised BERT token classifier with MiniLM's WordPiece tokenizer, in a folder
named after ``bert-base-multilingual-cased`` (LLMLingua-2 picks its
word-splitting rules from the model name): which words it keeps is noise, how
many it keeps and what it returns is not.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import math
import re
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch
from tests.fakes.tiny_models import build_tiny_llmlingua2

from chatfleet.serving.config import CompressorConfig
from chatfleet.serving.errors import EngineUnavailable, PayloadTooLarge, RequestError
from chatfleet.serving.routing import Compressor
from chatfleet.serving.routing.compressor import cl100k_base

torch.set_num_threads(1)

PARAGRAPHS = [
    "The city council met on Tuesday evening to debate a proposal to expand the network of"
    " protected bike lanes across the downtown area. The proposal, which had been under"
    " discussion for more than a year, would add twelve kilometres of separated lanes along"
    " the main commuter corridors, including Harbour Street, Mill Road and the eastern"
    " approach to the central station.",
    "Supporters of the plan pointed to figures from the transport department showing that the"
    " number of people cycling to work had risen by nearly forty percent over the past three"
    " years, while the number of serious collisions involving cyclists had also increased."
    " Several residents spoke about near misses at junctions where painted lanes simply end"
    " and riders are forced into traffic.",
    "Opponents, mostly representatives of local businesses on Mill Road, argued that removing"
    " on-street parking would reduce the number of customers who could reach their shops. One"
    " café owner said that half of her customers arrive by car and that deliveries would"
    " become far more difficult if loading bays were moved around the corner.",
    "After nearly four hours of debate, the council voted nine to four in favour of the"
    " expansion, with an amendment requiring the transport department to create new loading"
    " zones on side streets and to review parking demand six months after each section opens."
    " Construction of the first section is expected to begin in the spring and to last about"
    " five months.",
    "The mayor said the decision was a balance between safety and commerce, and promised that"
    " the city would publish monthly updates on the project's budget, which is currently"
    " estimated at eighteen million euros, roughly a third of which is expected to come from"
    " a national grant for sustainable transport. Critics on the council questioned whether"
    " the grant had actually been confirmed.",
    "In other business, the council approved a new schedule for rubbish collection in the"
    " northern districts, postponed a vote on the renovation of the municipal swimming pool"
    " until the next session, and heard a short report on the winter preparations of the"
    " roads department, which has stocked three thousand tonnes of grit and salt ahead of the"
    " cold season.",
    "Local cycling groups welcomed the vote but warned that the lanes would only be used if"
    " they connected to each other. A spokesperson pointed out that the current network"
    " consists of short, isolated stretches, and that parents in particular would not let"
    " their children ride to school until a continuous route existed from the residential"
    " neighbourhoods in the west to the schools near the river.",
    "The transport department will hold three public workshops in January to present detailed"
    " designs for each street. Residents will be able to comment on the position of crossings,"
    " bus stops and loading zones, and the department has promised to publish all comments"
    " together with its responses before the final designs are approved.",
    "The next meeting of the council is scheduled for the first Tuesday of next month, when"
    " members are expected to discuss the draft budget for the coming year, including"
    " proposals to raise parking charges in the city centre and to extend the opening hours"
    " of the public library on weekends.",
]
TEXT = "\n\n".join(PARAGRAPHS)
QUESTION = "Question: What did the council decide about the bike lanes, and why?"


@pytest.fixture(scope="module")
def encoding_tokens() -> int:
    return len(cl100k_base().encode(TEXT))


def test_the_text_is_about_600_tokens(encoding_tokens: int) -> None:
    assert 550 <= encoding_tokens <= 700


# --- cl100k_base offline --------------------------------------------------------------


def test_cl100k_base_loads_offline_and_restores_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tiktoken.load
    import tiktoken.registry

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "the-users-own"))

    encoding = cl100k_base()

    assert encoding.name == "cl100k_base"
    assert encoding.encode("hello world") == [15339, 1917]
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "the-users-own")
    assert not (tmp_path / "the-users-own").exists()
    # Later lookups (llmlingua's) come from tiktoken's registry, still offline.
    assert tiktoken.encoding_for_model("gpt-3.5-turbo") is encoding

    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    cl100k_base()
    assert "TIKTOKEN_CACHE_DIR" not in os.environ


# --- no model needed: skips and bad input ----------------------------------------------


def test_short_context_is_returned_unchanged_without_loading() -> None:
    compressor = Compressor(CompressorConfig(min_tokens=400))
    result = compressor.compress(PARAGRAPHS[0], QUESTION)
    assert result.skipped
    assert result.text == f"{PARAGRAPHS[0]}\n\n{QUESTION}"
    assert result.original_tokens == result.compressed_tokens > 0
    assert result.ratio == 1.0

    assert compressor.compress(PARAGRAPHS[0]).text == PARAGRAPHS[0]
    # The threshold counts the context only: a long question does not trigger it.
    assert compressor.compress("Short context.", TEXT).skipped
    # A ratio of 1 keeps everything.
    assert compressor.compress(TEXT, QUESTION, ratio=1.0).skipped
    # Blank context items are dropped; the question alone passes through.
    only_question = compressor.compress(["", "  \n"], QUESTION)
    assert only_question.skipped
    assert only_question.text == QUESTION
    assert not compressor.loaded


@pytest.mark.parametrize("ratio", [0, 0.0, -0.5, 1.01, 2, math.nan, math.inf, True])
def test_ratio_outside_zero_one_is_rejected(ratio: float) -> None:
    compressor = Compressor(CompressorConfig())
    with pytest.raises(RequestError, match="ratio") as caught:
        compressor.compress(TEXT, QUESTION, ratio=ratio)
    assert caught.value.param == "ratio"


def test_text_over_the_limit_is_rejected(encoding_tokens: int) -> None:
    compressor = Compressor(CompressorConfig(max_input_tokens=encoding_tokens - 1))
    with pytest.raises(PayloadTooLarge, match=f"{encoding_tokens} tokens") as caught:
        compressor.compress(TEXT)
    assert isinstance(caught.value, RequestError)
    assert caught.value.param == "text"
    # The question counts too.
    compressor = Compressor(CompressorConfig(max_input_tokens=encoding_tokens))
    with pytest.raises(PayloadTooLarge):
        compressor.compress(TEXT, QUESTION)


@pytest.mark.parametrize(
    ("context", "question"),
    [("", ""), ("   ", ""), ([], ""), (["", " "], " "), ([1, 2], "q"), (None, "q")],
)
def test_nothing_or_not_text_to_compress_is_rejected(context: object, question: str) -> None:
    with pytest.raises(RequestError) as caught:
        Compressor(CompressorConfig()).compress(context, question)  # type: ignore[arg-type]
    assert caught.value.param == "text"


def test_llmlingua2_model_name_must_name_its_tokenizer_family() -> None:
    compressor = Compressor(CompressorConfig(method="llmlingua2", model="/models/my-compressor"))
    with pytest.raises(ValueError, match="xlm-roberta-large"):
        compressor.load()


def test_missing_llmlingua_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llmlingua", None)
    compressor = Compressor(CompressorConfig(method="llmlingua2", model="x/xlm-roberta-large"))
    with pytest.raises(EngineUnavailable, match=r"llmlingua.*chatfleet\[serving\]"):
        compressor.load()


# --- LLMLingua-2 mechanics on a tiny random token classifier ----------------------------


@pytest.fixture(scope="module")
def llmlingua2(tmp_path_factory: pytest.TempPathFactory) -> Compressor:
    folder = build_tiny_llmlingua2(tmp_path_factory.mktemp("llmlingua2"))
    compressor = Compressor(
        CompressorConfig(method="llmlingua2", model=str(folder), min_tokens=100)
    )
    compressor.load()
    return compressor


def _words(text: str) -> list[str]:
    plain = unicodedata.normalize("NFKD", text.lower())
    return re.findall(r"\w+", "".join(c for c in plain if not unicodedata.combining(c)))


def test_llmlingua2_keeps_about_the_requested_share(llmlingua2: Compressor) -> None:
    for ratio in (0.3, 0.5, 0.7):
        started = time.perf_counter()
        result = llmlingua2.compress(TEXT, QUESTION, ratio=ratio)
        elapsed = time.perf_counter() - started
        assert not result.skipped
        assert result.text.endswith(f"\n\n{QUESTION}")
        context = result.text.removesuffix(f"\n\n{QUESTION}")
        achieved = llmlingua2.count_tokens(context) / llmlingua2.count_tokens(TEXT)
        print(f"\nLLMLingua-2 (tiny random head) ratio {ratio}: {achieved:.2f} in {elapsed:.2f} s")
        assert achieved == pytest.approx(ratio, abs=0.12)
        # It deletes words; it never invents any (MiniLM's tokenizer lowercases and
        # strips accents, as _words does).
        assert set(_words(context)) <= set(_words(TEXT))
        assert result.original_tokens == llmlingua2.count_tokens(f"{TEXT}\n\n{QUESTION}")
        assert result.compressed_tokens == llmlingua2.count_tokens(result.text)


def test_llmlingua2_list_context_and_determinism(llmlingua2: Compressor) -> None:
    items = ["", PARAGRAPHS[0], " ", *PARAGRAPHS[1:5], "\n"]
    first = llmlingua2.compress(items, QUESTION, ratio=0.5)
    second = llmlingua2.compress(items, QUESTION, ratio=0.5)
    assert first == second
    assert not first.skipped
    assert first.ratio < 0.8
    assert first.text.endswith(QUESTION)
    assert not first.text.startswith("\n")


# --- the real original LLMLingua on SmolLM2 --------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> Compressor:
    compressor = Compressor(CompressorConfig(method="llmlingua", min_tokens=200))
    started = time.perf_counter()
    compressor.load()
    print(f"\nLLMLingua + SmolLM2 loaded in {time.perf_counter() - started:.1f} s")
    return compressor


@pytest.mark.slow
def test_smollm2_llmlingua_achieves_the_requested_ratio(smollm2: Compressor) -> None:
    started = time.perf_counter()
    result = smollm2.compress(TEXT, QUESTION, ratio=0.5)
    elapsed = time.perf_counter() - started

    assert not result.skipped
    assert result.text.endswith(f"\n\n{QUESTION}")  # the question, verbatim, last
    context = result.text.removesuffix(f"\n\n{QUESTION}")
    achieved = smollm2.count_tokens(context) / smollm2.count_tokens(TEXT)
    print(
        f"\nLLMLingua + SmolLM2: {result.original_tokens} -> {result.compressed_tokens} tokens,"
        f" context ratio {achieved:.2f} for 0.5 (whole text {result.ratio:.2f}) in {elapsed:.1f} s"
    )
    assert achieved == pytest.approx(0.5, abs=0.12)
    assert QUESTION not in context
    # Token-level deletion may leave fragments ("main com|muter" -> "mainuter"),
    # but most of what remains are the text's own words.
    words = _words(context)
    assert sum(w in set(_words(TEXT)) for w in words) >= 0.8 * len(words)


@pytest.mark.slow
def test_smollm2_llmlingua_list_context(smollm2: Compressor) -> None:
    items = [PARAGRAPHS[0], "", *PARAGRAPHS[1:6]]
    started = time.perf_counter()
    result = smollm2.compress(items, ratio=0.3)
    elapsed = time.perf_counter() - started
    original = "\n\n".join(p for p in items if p)
    achieved = result.compressed_tokens / smollm2.count_tokens(original)
    print(f"\nLLMLingua + SmolLM2, 6 items at 0.3: {achieved:.2f} in {elapsed:.1f} s")
    assert not result.skipped
    assert achieved == pytest.approx(0.3, abs=0.12)
