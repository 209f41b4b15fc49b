"""Task scores: ASR (WER/CER), captions (BLEU, ROUGE-L, CIDEr), multiple choice (accuracy), QA (exact match, token F1).

Text normalisation for ASR (`normalize_transcript`), documented because WER depends on it:
1. Unicode NFKC (full-width forms -> ASCII, ligatures split), then lower case (casefold).
2. Every character of a Unicode punctuation class (P*) or symbol class (S*) becomes a space, except an
   apostrophe inside a word ("don't" stays one word).
3. Whitespace runs collapse to one space; leading/trailing space is dropped.
No spelling, number or abbreviation rewriting (Whisper's English normaliser does that; it is English-only).
CJK (Chinese, Japanese kana, Korean Hangul and CJK punctuation ranges): such text has no word spaces, so its
"words" are its characters: each CJK character is a token for WER, and CER is computed on the text with spaces
removed. Every sample is assigned a script group (`cjk` when most letters of the reference are CJK, else
`other`) and scores are reported per group as well as overall.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from typing import Iterable

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\u1100-\u11ff\u3130-\u318f]")


def is_cjk_char(ch: str) -> bool:
    return bool(_CJK.match(ch))


def script_group(text: str) -> str:
    """'cjk' when most letters are CJK characters, else 'other'."""
    letters = [c for c in text if c.isalnum()]
    cjk = sum(is_cjk_char(c) for c in letters)
    return "cjk" if letters and cjk * 2 >= len(letters) else "other"


def normalize_transcript(text: str) -> str:
    """The ASR normaliser described in the module docstring."""
    text = unicodedata.normalize("NFKC", text).casefold()
    out = []
    for i, ch in enumerate(text):
        cat = unicodedata.category(ch)
        if ch == "'" and 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum():
            out.append(ch)
        elif cat[0] in "PS":
            out.append(" ")
        else:
            out.append(ch)
    return " ".join("".join(out).split())


def tokens(text: str) -> list[str]:
    """Words of normalised text, with every CJK character a word of its own."""
    return "".join(f" {c} " if is_cjk_char(c) else c for c in text).split()


def _wer_parts(ref: list[str], hyp: list[str]) -> tuple[int, int]:
    """(edits, reference length) from jiwer's alignment, on pre-split tokens."""
    import jiwer

    if not ref:
        return len(hyp), 0
    out = jiwer.process_words(" ".join(ref), " ".join(hyp) if hyp else "")
    return out.substitutions + out.deletions + out.insertions, len(ref)


def asr_sample(prediction: str, reference: str) -> dict[str, float | int | str]:
    """Per-sample ASR counts and rates (normalised as documented)."""
    ref, hyp = normalize_transcript(reference), normalize_transcript(prediction)
    w_err, w_n = _wer_parts(tokens(ref), tokens(hyp))
    c_err, c_n = _wer_parts(list(ref.replace(" ", "")), list(hyp.replace(" ", "")))
    return {"wer": w_err / max(w_n, 1), "cer": c_err / max(c_n, 1), "word_errors": w_err, "words": w_n,
            "char_errors": c_err, "chars": c_n, "script": script_group(ref)}


def asr_scores(predictions: list[str], references: list[str], samples: list[dict] | None = None) -> dict[str, float]:
    """Corpus WER and CER (errors summed over samples / reference length summed), overall and per script.
    `samples`: the asr_sample dicts when already computed (the runner has them), so jiwer runs once a sample."""
    if samples is None:
        samples = [asr_sample(p, r) for p, r in zip(predictions, references)]
    out = _asr_totals(samples, "")
    for group in ("cjk", "other"):
        part = [s for s in samples if s["script"] == group]
        if part and len(part) < len(samples):
            out.update(_asr_totals(part, f"{group}_"))
    return out


def _asr_totals(samples: list[dict], prefix: str) -> dict[str, float]:
    words, chars = sum(s["words"] for s in samples), sum(s["chars"] for s in samples)
    return {f"{prefix}wer": sum(s["word_errors"] for s in samples) / max(words, 1),
            f"{prefix}cer": sum(s["char_errors"] for s in samples) / max(chars, 1),
            f"{prefix}samples": float(len(samples))}


# ---------------------------------------------------------------------------------------------------------------
# Captions


class _RougeTokenizer:
    """rouge-score's default tokenizer drops every non-ASCII letter (CJK text scores 0): use ours."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(normalize_transcript(text))


def caption_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu; 'zh' tokenisation when the references are mostly CJK, else '13a'), mean
    ROUGE-L F1 (rouge-score, with the CJK-aware tokeniser), both 0-100, and CIDEr (`cider`)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    cjk = sum(script_group(r) == "cjk" for r in references) * 2 > len(references)
    bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if cjk else "13a")
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return {"bleu": float(bleu.score), "rougeL": 100.0 * sum(rouge) / max(len(rouge), 1),
            "cider": cider(predictions, [[r] for r in references])}


def _ngrams(words: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def cider(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr as the COCO caption evaluation computes it (Vedantam et al. 2015, with COCO's Gaussian length
    penalty and clipped n-gram counts, x10), n = 1..4, document frequencies over this set of references.

    Text goes through our normaliser (CJK per character) instead of COCO's Java PTB tokenizer. There is no
    maintained pip package for it (pycocoevalcap is a 100 MB wheel of Java jars); tests/test_eval_metrics.py
    pins values computed with pycocoevalcap's scorer on the same tokens.
    """
    def tok(text: str) -> list[str]:
        return tokens(normalize_transcript(text))

    hyps = [_ngrams(tok(p)) for p in predictions]
    refs = [[_ngrams(tok(r)) for r in rs] for rs in references]
    df: Counter = Counter()
    for rs in refs:
        df.update({g for r in rs for g in r})
    log_n = math.log(max(len(refs), 1))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        for g, tf in counts.items():
            n = len(g) - 1
            vec[n][g] = tf * (log_n - math.log(max(1.0, df[g])))
            norm[n] += vec[n][g] ** 2
        # COCO's scorer takes the length from the bigram counts (its `n == 1`): kept for comparable numbers.
        length = sum(tf for g, tf in counts.items() if len(g) == 2)
        return vec, [math.sqrt(x) for x in norm], length

    total = 0.0
    for h, rs in zip(hyps, refs):
        vh, nh, lh = vector(h)
        score = [0.0] * 4
        for r in rs:
            vr, nr, lr = vector(r)
            for n in range(4):
                val = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vh[n].items())
                if nh[n] and nr[n]:
                    val /= nh[n] * nr[n]
                score[n] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
        total += 10.0 * (sum(score) / 4) / max(len(rs), 1)
    return total / max(len(hyps), 1)


def caption_sample(prediction: str, reference: str) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokenizer())
    cjk = script_group(reference) == "cjk"
    return {"bleu": float(sacrebleu.sentence_bleu(prediction, [reference], tokenize="zh" if cjk else "13a").score),
            "rougeL": 100.0 * scorer.score(reference, prediction)["rougeL"].fmeasure}


# ---------------------------------------------------------------------------------------------------------------
# Multiple choice

_OPTION_LINE = re.compile(r"^\s*[\(\[]?([A-Z])[\)\]\.:：、]\s*(.+?)\s*$", re.M)
_ANSWER_PATTERNS = [
    r"(?:answer|option|choice|答案|选项)\s*(?:is|:|：|是|为)?\s*[\(\[\*]*\s*([A-Z])\b",
    r"^[\s\*\(\[]*([A-Z])(?:[\)\]\.:：、\*]|\s*$|\s)",
    r"[\(\[]([A-Z])[\)\]]",
    r"\*\*([A-Z])\*\*",
]


def parse_options(prompt: str) -> dict[str, str]:
    """Options listed one per line in an MMLU-style prompt: 'A. text', '(B) text', 'C) text' -> {letter: text}."""
    found = {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(prompt)}
    # Only a run starting at A counts as options (a line "I. Introduction" alone is not a choice list).
    letters = []
    for letter in string.ascii_uppercase:
        if letter not in found:
            break
        letters.append(letter)
    return {k: found[k] for k in letters} if len(letters) >= 2 else {}


def extract_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The answer letter in a model's reply, or None. Tries, in order: 'answer is X' / 'Answer: (X)', a reply
    starting with the letter ('B', 'B.', '(B) ...'), '(X)', '**X**', then the one option whose text the reply
    contains. With `options`, only their letters count."""
    valid = set(options) if options else set(string.ascii_uppercase)
    reply = unicodedata.normalize("NFKC", text).strip()
    for pattern in _ANSWER_PATTERNS:
        for m in re.finditer(pattern, reply, flags=re.I | re.M):
            letter = m.group(1).upper()
            # A lower-case 'a' or 'i' opening a reply is English, not a choice: lower case counts only after
            # 'answer' or in parentheses.
            if m.group(1).islower() and pattern in (_ANSWER_PATTERNS[1], _ANSWER_PATTERNS[3]):
                continue
            if letter in valid:
                return letter
    if options:
        low = normalize_transcript(reply)
        hits = [k for k, v in options.items() if normalize_transcript(v) and normalize_transcript(v) in low]
        if len(hits) == 1:
            return hits[0]
    return None


def mcq_sample(prediction: str, reference: str, prompt: str = "") -> dict[str, float | str | None]:
    options = parse_options(prompt)
    want = extract_choice(reference, options or None)
    got = extract_choice(prediction, options or None)
    return {"choice": got, "answer": want, "correct": float(got is not None and got == want),
            "unparsed": float(got is None)}


def mcq_scores(samples: Iterable[dict]) -> dict[str, float]:
    samples = list(samples)
    n = max(len(samples), 1)
    return {"accuracy": sum(s["correct"] for s in samples) / n, "unparsed": sum(s["unparsed"] for s in samples) / n}


# ---------------------------------------------------------------------------------------------------------------
# QA (SQuAD-style)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normaliser (lower case, no punctuation, no English articles), made Unicode-aware."""
    text = normalize_transcript(text).replace("'", "")
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def qa_sample(prediction: str, reference: str) -> dict[str, float]:
    pred, ref = tokens(normalize_answer(prediction)), tokens(normalize_answer(reference))
    em = float(pred == ref)
    common = Counter(pred) & Counter(ref)
    overlap = sum(common.values())
    if not pred or not ref:
        f1 = float(pred == ref)
    elif overlap == 0:
        f1 = 0.0
    else:
        p, r = overlap / len(pred), overlap / len(ref)
        f1 = 2 * p * r / (p + r)
    return {"exact_match": em, "f1": f1}


def mean_of(samples: Iterable[dict], keys: Iterable[str]) -> dict[str, float]:
    samples = list(samples)
    return {k: sum(float(s[k]) for s in samples) / max(len(samples), 1) for k in keys}


TASKS = ("asr", "caption", "mcq", "qa", "free", "speech", "voice")


def sample_scores(task: str, prediction: str, reference: str, prompt: str = "") -> dict:
    """Per-sample scores for one generation task."""
    if task == "asr":
        return asr_sample(prediction, reference)
    if task == "caption":
        return caption_sample(prediction, reference)
    if task == "mcq":
        return mcq_sample(prediction, reference, prompt)
    if task == "qa":
        return qa_sample(prediction, reference)
    raise ValueError(f"task {task!r} has no generation scores (tasks: {', '.join(TASKS)})")


def corpus_scores(task: str, predictions: list[str], references: list[str], samples: list[dict]) -> dict[str, float]:
    """The headline scores of a generation task over all samples."""
    if task == "asr":
        return asr_scores(predictions, references, samples)
    if task == "caption":
        return caption_scores(predictions, references)
    if task == "mcq":
        return mcq_scores(samples)
    if task == "qa":
        return mean_of(samples, ("exact_match", "f1"))
    raise ValueError(f"task {task!r} has no generation scores (tasks: {', '.join(TASKS)})")


# Which direction is better, for the report's delta column.
HIGHER_IS_BETTER = {"wer": False, "cer": False, "loss": False, "perplexity": False, "unparsed": False,
                    "ce": False}
