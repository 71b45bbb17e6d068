"""Caption metrics in pure Python: CIDEr-D and corpus BLEU-1..4, computed as the COCO caption evaluation does.

Both candidates and references first go through `ptb_tokenize`, a Python stand-in for the Stanford
PTBTokenizer call of the COCO toolkit (lowercase, punctuation split off, clitics such as 's and n't made
separate tokens, then the toolkit's punctuation tokens removed). On already tokenized lowercase text it is the
identity, so `cider_d`/`bleu` agree with pycocoevalcap's CiderScorer/BleuScorer fed the same tokens.

CIDEr-D (pycocoevalcap's `Cider`): n-grams n=1..4, tf-idf vectors with document frequencies taken from the
reference corpus (one document per image), idf = log(#images) - log(max(1, df)); per n the clipped cosine
sum(min(h, r) * r) / (|h| |r|) times the Gaussian length penalty exp(-(l_h - l_r)^2 / (2 sigma^2)), sigma 6,
averaged over n and over the references, times 10. Lengths are measured as pycocoevalcap measures them (the
number of bigrams, which equals the word count minus one and so gives the same difference whenever both
sentences have a word). BLEU (pycocoevalcap's `Bleu`): clipped n-gram precisions summed over the corpus, the
closest reference length (ties to the shorter) for the brevity penalty, and the toolkit's 1e-15 / 1e-9
smoothing constants.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Tokens the COCO toolkit removes after PTB tokenization (lowercased, as the tokenizer runs with -lowerCase).
PTB_REMOVED_TOKENS: frozenset[str] = frozenset(
    {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
)
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_ABBREVIATION = re.compile(r"^(?:[a-z]\.){2,}$")
_SPLIT_ANYWHERE = re.compile(r"(\.\.\.|[?!;])")
_SPLIT_UNLESS_BETWEEN_DIGITS = re.compile(r"(?<!\d)([,:])|([,:])(?!\d)")
_DROPPED_CHARACTERS = re.compile(r"[()\[\]{}\"]")
_QUOTE_MAP = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"'})
_EDGE_PUNCTUATION = "'`-."


def _split_token(token: str) -> list[str]:
    """Split one whitespace token into PTB tokens: edge quotes/hyphens/periods, then clitics."""
    if token in _CLITICS or token in PTB_REMOVED_TOKENS:
        return [token]
    leading: list[str] = []
    while token and token[0] in "'`" and token not in _CLITICS:
        leading.append(token[0])
        token = token[1:]
    trailing: list[str] = []
    while token and token[-1] in _EDGE_PUNCTUATION:
        if token[-1] == "." and _ABBREVIATION.match(token):
            break
        trailing.insert(0, token[-1])
        token = token[:-1]
    pieces: list[str] = []
    if token == "cannot":
        pieces = ["can", "not"]
    elif token:
        pieces = [token]
        for clitic in _CLITICS:
            if token.endswith(clitic) and len(token) > len(clitic):
                pieces = [token[: -len(clitic)], clitic]
                break
    return leading + pieces + trailing


def ptb_tokenize(text: str) -> str:
    """Lowercase PTB-style tokenization with the COCO toolkit's punctuation tokens removed; tokens joined by ' '."""
    if not isinstance(text, str):
        raise ValueError(f"caption must be a string, got {type(text).__name__}")
    text = text.translate(_QUOTE_MAP).lower().replace("\n", " ").replace("\t", " ")
    text = _DROPPED_CHARACTERS.sub(" ", text)
    text = _SPLIT_ANYWHERE.sub(r" \1 ", text)
    text = _SPLIT_UNLESS_BETWEEN_DIGITS.sub(lambda m: f" {m.group(1) or m.group(2)} ", text)
    tokens = [piece for word in text.split() for piece in _split_token(word)]
    return " ".join(token for token in tokens if token not in PTB_REMOVED_TOKENS)


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def _prepare(
    candidates: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], tokenize: bool
) -> tuple[list[Hashable], dict[Hashable, list[str]], dict[Hashable, list[list[str]]]]:
    if not isinstance(candidates, Mapping) or not isinstance(references, Mapping):
        raise ValueError("candidates and references must be dicts keyed by image id")
    if set(candidates) != set(references):
        only_c = [k for k in candidates if k not in references][:5]
        only_r = [k for k in references if k not in candidates][:5]
        raise ValueError(
            f"candidates and references must have the same ids; only in candidates: {only_c!r}, "
            f"only in references: {only_r!r}"
        )
    if not candidates:
        raise ValueError("no captions to score")
    prepare: Callable[[str], str] = ptb_tokenize if tokenize else (lambda s: s)
    ids = list(candidates)
    cand_words: dict[Hashable, list[str]] = {}
    ref_words: dict[Hashable, list[list[str]]] = {}
    for key in ids:
        candidate = candidates[key]
        if not isinstance(candidate, str):
            raise ValueError(f"candidate for id {key!r} must be one string, got {type(candidate).__name__}")
        refs = references[key]
        if isinstance(refs, str) or not isinstance(refs, Sequence) or len(refs) == 0:
            raise ValueError(f"references for id {key!r} must be a non-empty list of strings")
        for ref in refs:
            if not isinstance(ref, str):
                raise ValueError(f"references for id {key!r} must be strings, got {type(ref).__name__}")
        cand_words[key] = prepare(candidate).split()
        ref_words[key] = [prepare(ref).split() for ref in refs]
    return ids, cand_words, ref_words


def cider_d(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, dict[Hashable, float]]:
    """CIDEr-D of one candidate caption per id against its references: (corpus mean, {id: score})."""
    ids, cand_words, ref_words = _prepare(candidates, references, tokenize)
    cand_counts = {key: _ngrams(cand_words[key], n) for key in ids}
    ref_counts = {key: [_ngrams(words, n) for words in ref_words[key]] for key in ids}
    document_frequency: Counter[tuple[str, ...]] = Counter()
    for key in ids:
        document_frequency.update({gram for counts in ref_counts[key] for gram in counts})
    log_documents = math.log(float(len(ids)))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        squared = [0.0] * n
        length = 0
        for gram, term_frequency in counts.items():
            order = len(gram) - 1
            weight = float(term_frequency) * (
                log_documents - math.log(max(1.0, float(document_frequency.get(gram, 0))))
            )
            vectors[order][gram] = weight
            squared[order] += weight * weight
            if order == 1:
                length += term_frequency
        return vectors, [math.sqrt(s) for s in squared], length

    penalty_denominator = 2.0 * sigma**2
    per_id: dict[Hashable, float] = {}
    for key in ids:
        vec_h, norm_h, len_h = tfidf(cand_counts[key])
        total = 0.0
        for counts in ref_counts[key]:
            vec_r, norm_r, len_r = tfidf(counts)
            penalty = math.exp(-(float(len_h - len_r) ** 2) / penalty_denominator)
            per_order = 0.0
            for order in range(n):
                value = 0.0
                for gram, weight in vec_h[order].items():
                    ref_weight = vec_r[order].get(gram, 0.0)
                    value += min(weight, ref_weight) * ref_weight
                if norm_h[order] != 0 and norm_r[order] != 0:
                    value /= norm_h[order] * norm_r[order]
                per_order += value * penalty
            total += per_order / n
        per_id[key] = 10.0 * total / len(ref_counts[key])
    return sum(per_id.values()) / len(per_id), per_id


_TINY = 1e-15
_SMALL = 1e-9


def bleu(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    n: int = 4,
    tokenize: bool = True,
) -> tuple[list[float], dict[Hashable, list[float]]]:
    """Corpus BLEU-1..n and per-id sentence BLEU-1..n: ([BLEU-1, ..., BLEU-n], {id: [BLEU-1, ..., BLEU-n]})."""
    if n < 1:
        raise ValueError(f"BLEU order n must be >= 1, got {n}")
    ids, cand_words, ref_words = _prepare(candidates, references, tokenize)
    total_guess = [0] * n
    total_correct = [0] * n
    total_test_length = 0
    total_ref_length = 0
    per_id: dict[Hashable, list[float]] = {}
    for key in ids:
        words = cand_words[key]
        test_length = len(words)
        counts = _ngrams(words, n)
        max_ref_counts: dict[tuple[str, ...], int] = {}
        for ref in ref_words[key]:
            for gram, count in _ngrams(ref, n).items():
                max_ref_counts[gram] = max(max_ref_counts.get(gram, 0), count)
        ref_length = min((abs(len(ref) - test_length), len(ref)) for ref in ref_words[key])[1]
        guess = [max(0, test_length - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_ref_counts.get(gram, 0), count)
        per_id[key] = _bleu_from_counts(correct, guess, test_length, ref_length)
        total_test_length += test_length
        total_ref_length += ref_length
        for k in range(n):
            total_guess[k] += guess[k]
            total_correct[k] += correct[k]
    corpus = _bleu_from_counts(total_correct, total_guess, total_test_length, total_ref_length)
    return corpus, per_id


def _bleu_from_counts(correct: list[int], guess: list[int], test_length: int, ref_length: int) -> list[float]:
    scores = []
    product = 1.0
    for k in range(len(correct)):
        product *= (float(correct[k]) + _TINY) / (float(guess[k]) + _SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_length + _TINY) / (ref_length + _SMALL)
    if ratio < 1:
        scores = [score * math.exp(1 - 1 / ratio) for score in scores]
    return scores


def _load_coco_references(coco_captions_json: str | os.PathLike | Mapping) -> dict[Any, list[str]]:
    if isinstance(coco_captions_json, Mapping):
        data, name = coco_captions_json, "<coco captions>"
    else:
        path = Path(coco_captions_json)
        name = str(path)
        try:
            with path.open("r", encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise ValueError(f"COCO captions file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"COCO captions file {path} is not valid JSON: {error}") from None
    annotations = data.get("annotations") if isinstance(data, Mapping) else None
    if not isinstance(annotations, list):
        raise ValueError(
            f"{name}: expected a JSON object with a list under 'annotations' (COCO captions format)"
        )
    references: dict[Any, list[str]] = {}
    for index, record in enumerate(annotations):
        if not isinstance(record, Mapping) or "image_id" not in record or "caption" not in record:
            raise ValueError(f"{name}: annotation {index} needs the fields 'image_id' and 'caption'")
        if not isinstance(record["caption"], str):
            raise ValueError(f"{name}: annotation {index} has a caption that is not a string")
        references.setdefault(record["image_id"], []).append(record["caption"])
    if not references:
        raise ValueError(f"{name}: no caption annotations")
    return references


def evaluate_captions(
    predictions: Mapping | Sequence,
    coco_captions_json: str | os.PathLike | Mapping,
    subset: bool = False,
) -> dict[str, Any]:
    """CIDEr-D and BLEU-1..4 of predictions ({image_id: caption} or COCO result records) on a COCO captions file.

    Every annotated image needs a prediction unless `subset=True` (then only predicted images are scored, and,
    as in the COCO toolkit, CIDEr-D's document frequencies come from the scored images only).
    """
    references = _load_coco_references(coco_captions_json)
    lookup = {str(image_id): image_id for image_id in references}
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        items = []
        for index, record in enumerate(predictions):
            if not isinstance(record, Mapping) or "image_id" not in record or "caption" not in record:
                raise ValueError(f"predictions: record {index} needs the fields 'image_id' and 'caption'")
            items.append((record["image_id"], record["caption"]))
    else:
        raise ValueError("predictions must be a dict {image_id: caption} or a list of COCO result records")
    candidates: dict[Any, str] = {}
    unknown = []
    for image_id, caption in items:
        if str(image_id) not in lookup:
            unknown.append(image_id)
            continue
        key = lookup[str(image_id)]
        if key in candidates:
            raise ValueError(f"predictions hold image {image_id!r} twice")
        candidates[key] = caption
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted image ids have no reference captions, e.g. {unknown[:5]!r}"
        )
    missing = [image_id for image_id in references if image_id not in candidates]
    if missing and not subset:
        raise ValueError(
            f"{len(missing)} annotated images have no predicted caption, e.g. {missing[:5]!r} "
            "(pass subset=True to score only the predicted images)"
        )
    scored_refs = {key: references[key] for key in candidates}
    cider_score, cider_per_id = cider_d(candidates, scored_refs)
    bleu_scores, bleu_per_id = bleu(candidates, scored_refs)
    result: dict[str, Any] = {"CIDEr-D": cider_score}
    result.update({f"BLEU-{k + 1}": score for k, score in enumerate(bleu_scores)})
    result["per_image"] = {
        key: {"CIDEr-D": cider_per_id[key], "BLEU-4": bleu_per_id[key][3]} for key in candidates
    }
    result["num_images"] = len(candidates)
    return result
