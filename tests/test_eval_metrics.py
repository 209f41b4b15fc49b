"""Task metrics: the documented normaliser, WER/CER (CJK per character), BLEU/ROUGE-L/CIDEr, MCQ letters, QA EM/F1."""

from __future__ import annotations

import pytest

from omnitune.eval.metrics import (asr_sample, asr_scores, caption_scores, cider, extract_choice, mcq_sample,
                                   mcq_scores, normalize_transcript, parse_options, qa_sample, script_group, tokens)

OPTIONS = "Which city is the capital of France?\nA. London\nB. Berlin\nC) Rome\nD. Paris\nAnswer:"


def test_normaliser_folds_case_width_and_punctuation_but_keeps_inner_apostrophes():
    assert normalize_transcript("Hello,  World! Don't stop—ＡＢＣ.") == "hello world don't stop abc"
    assert normalize_transcript("'quoted' text") == "quoted text"


def test_cjk_characters_are_words_of_their_own():
    assert tokens("我爱北京 ok go") == ["我", "爱", "北", "京", "ok", "go"]
    assert script_group("我爱北京天安门 ok") == "cjk" and script_group("hello 你") == "other"


def test_wer_and_cer_count_edits_over_reference_length():
    s = asr_sample("the cat sat", "The cat sat on the mat.")
    assert (s["word_errors"], s["words"]) == (3, 6) and s["wer"] == pytest.approx(0.5)
    assert asr_sample("Hello, world!", "hello world")["wer"] == 0.0


def test_corpus_asr_scores_sum_errors_and_split_by_script():
    out = asr_scores(["hello world", "我爱北京天安门"], ["Hello, world!", "我爱北京天坛"])
    # 0 word errors of 2, then 天安门 vs 天坛: one substitution + one insertion over 6 characters
    assert out["wer"] == pytest.approx(2 / 8)
    assert out["cjk_cer"] == pytest.approx(2 / 6) and out["other_wer"] == 0.0
    assert out["samples"] == 2


def test_caption_scores_are_100_for_identical_text_and_lower_otherwise():
    same = caption_scores(["a cat sits on the mat"], ["a cat sits on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == pytest.approx(100.0)
    diff = caption_scores(["a dog runs"], ["a cat sits on the mat"])
    assert diff["bleu"] < 50 and 0 < diff["rougeL"] < 100


def test_rouge_l_scores_cjk_text():  # rouge-score's own tokenizer would drop every CJK character
    assert caption_scores(["一只猫"], ["一只狗"])["rougeL"] == pytest.approx(100 * 2 / 3)


def test_parse_options_reads_lettered_lines():
    assert parse_options(OPTIONS) == {"A": "London", "B": "Berlin", "C": "Rome", "D": "Paris"}
    assert parse_options("I. Introduction\nno options here") == {}


@pytest.mark.parametrize("reply,letter", [
    ("D", "D"), ("D. Paris", "D"), ("(d) Paris", "D"), ("The answer is (D).", "D"), ("Answer: d", "D"),
    ("**D**", "D"), ("I think it is Paris.", "D"), ("Its capital is Paris, not London.", None),
    ("a city in Europe", None), ("E", None), ("", None),
])
def test_extract_choice(reply, letter):
    assert extract_choice(reply, parse_options(OPTIONS)) == letter


def test_mcq_accuracy_counts_unparsed_replies_as_wrong():
    samples = [mcq_sample("D", "D", OPTIONS), mcq_sample("Paris", "D. Paris", OPTIONS), mcq_sample("hmm", "D", OPTIONS)]
    assert mcq_scores(samples) == {"accuracy": pytest.approx(2 / 3), "unparsed": pytest.approx(1 / 3)}


def test_qa_exact_match_and_token_f1_follow_squad():
    assert qa_sample("The Eiffel Tower.", "eiffel tower") == {"exact_match": 1.0, "f1": 1.0}
    assert qa_sample("in Paris, France", "Paris") == {"exact_match": 0.0, "f1": pytest.approx(0.5)}
    assert qa_sample("London", "Paris") == {"exact_match": 0.0, "f1": 0.0}
    assert qa_sample("北京市", "北京")["f1"] == pytest.approx(0.8)


def test_cider_matches_the_coco_caption_scorer():
    # Expected values: pycocoevalcap 1.2's Cider().compute_score on the same normalised tokens.
    preds = ["a cat sits on the mat", "a dog runs in the park", "two people ride bikes", "一只猫坐在垫子上"]
    refs = [["the cat sat on the mat", "a cat on a mat"], ["a dog is running through a park"],
            ["people riding bicycles down a road"], ["一只猫在垫子上"]]
    assert cider(preds, refs) == pytest.approx(2.77931683580718, rel=1e-9)
    assert cider(preds, [r[:1] for r in refs]) == pytest.approx(2.932104781319502, rel=1e-9)
    assert caption_scores(preds, [r[0] for r in refs])["cider"] == pytest.approx(2.932104781319502, rel=1e-9)


def test_asr_corpus_scores_from_the_runners_samples_equal_scoring_from_scratch():
    from omnitune.eval.metrics import asr_scores, corpus_scores, sample_scores

    preds, refs = ["the cat sat", "你好世界", "hello"], ["the cat sat down", "你好世界啊", "hello there"]
    samples = [sample_scores("asr", p, r) for p, r in zip(preds, refs)]
    assert corpus_scores("asr", preds, refs, samples) == asr_scores(preds, refs)
