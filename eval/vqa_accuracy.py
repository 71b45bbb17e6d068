"""VQAv2 accuracy: the official answer normalization and the 10-annotator leave-one-out soft score.

Normalization follows the official VQA evaluation (`vqaEval.py`): newlines/tabs become spaces, punctuation is
deleted (when it touches a space, or anywhere once the text holds a digit-comma-digit) or replaced by a space,
periods not followed by a digit are dropped, then the text is lowercased, number words map to digits, articles
are removed and apostrophe-less contractions get their apostrophes back.

Scoring follows the official loop: for each annotator i, the prediction earns min(#other annotators that gave
it / 3, 1); the question's accuracy is the mean over the annotators. As in the official script the reference
answers are only punctuation-processed, and only when the annotators disagree (VQAv2 annotation answers are
already normalized); `normalize_references=True` runs the full normalization on them instead, for annotation
files that were not normalized. Accuracies are reported in percent, unrounded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve", "didnt": "didn’t", "doesnt": "doesn’t",
    "dont": "don’t", "hadnt": "hadn’t", "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t",
    "havent": "haven’t", "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s",
    "howd": "how’d", "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve", "itll": "it’ll",
    "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t", "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve", "mightve": "might’ve", "mustnt": "mustn’t", "mustve": "must’ve",
    "neednt": "needn’t", "notve": "not’ve", "oclock": "o’clock", "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at", "’ow’sat": "’ow’s’at", "shant": "shan’t",
    "shed’ve": "she’d’ve", "she’dve": "she’d’ve", "she’s": "she’s", "shouldve": "should’ve",
    "shouldnt": "shouldn’t", "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd", "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s", "thered": "there’d",
    "thered’ve": "there’d’ve", "there’dve": "there’d’ve", "therere": "there’re", "theres": "there’s",
    "theyd": "they’d", "theyd’ve": "they’d’ve", "they’dve": "they’d’ve", "theyll": "they’ll",
    "theyre": "they’re", "theyve": "they’ve", "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve",
    "we’dve": "we’d’ve", "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re",
    "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d", "wheres": "where's",
    "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve", "who’dve": "who’d’ve", "wholl": "who’ll",
    "whos": "who’s", "whove": "who've", "whyll": "why’ll", "whyre": "why’re", "whys": "why’s",
    "wont": "won’t", "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve", "youd": "you’d",
    "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll", "youre": "you’re", "youve": "you’ve",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

PUNCTUATION: tuple[str, ...] = (
    ";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?",
)  # fmt: skip

# The official pattern, kept verbatim: its "(?!<=\d)" is a look-ahead (not a look-behind), so in effect every
# period that is not followed by a digit is removed.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official script passes re.UNICODE (== 32) positionally to `sub`, where it lands on `count`: at most 32
# periods are stripped. Kept for exact agreement.
OFFICIAL_PERIOD_STRIP_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official `processPunctuation` step."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=OFFICIAL_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """The official `processDigitArticle` step: lowercase, number words to digits, drop articles, contractions."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(s: str) -> str:
    """Normalize a predicted answer exactly as the official VQA evaluation does."""
    if not isinstance(s, str):
        raise ValueError(f"answer must be a string, got {type(s).__name__}")
    text = s.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _prepare_references(gt_answers: Sequence[str], normalize_references: bool) -> list[str]:
    if normalize_references:
        return [normalize_answer(a) for a in gt_answers]
    if len(set(gt_answers)) > 1:
        return [process_punctuation(a) for a in gt_answers]
    return list(gt_answers)


def vqa_score(pred: str, gt_answers: Sequence[str], normalize_references: bool = False) -> float:
    """Soft VQA accuracy in [0, 1] of one prediction against the annotators' answers (leave-one-out mean)."""
    if isinstance(gt_answers, str) or not isinstance(gt_answers, Sequence):
        raise ValueError("gt_answers must be a list of answer strings")
    if len(gt_answers) == 0:
        raise ValueError("gt_answers is empty: a VQA question needs at least one annotator answer")
    for answer in gt_answers:
        if not isinstance(answer, str):
            raise ValueError(f"gt_answers must hold strings, got {type(answer).__name__}")
    prediction = normalize_answer(pred)
    references = _prepare_references(gt_answers, normalize_references)
    matches = sum(1 for reference in references if reference == prediction)
    total = 0.0
    for reference in references:
        # Leaving annotator i out removes one match exactly when annotator i gave the predicted answer.
        others_matching = matches - (1 if reference == prediction else 0)
        total += min(1.0, others_matching / 3.0)
    return total / len(references)


def _load_json(source: str | os.PathLike | Mapping, what: str) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, f"<{what}>"
    path = Path(source)
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle), str(path)
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} file {path} is not valid JSON: {error}") from None


def _records(data: Mapping, key: str, name: str) -> list[Mapping]:
    records = data.get(key) if isinstance(data, Mapping) else None
    if not isinstance(records, list):
        raise ValueError(f"{name}: expected a JSON object with a list under '{key}' (VQAv2 format)")
    return records


def _require(record: Any, fields: Sequence[str], name: str, index: int) -> None:
    if not isinstance(record, Mapping):
        raise ValueError(f"{name}: entry {index} is not a JSON object")
    for key in fields:
        if key not in record:
            raise ValueError(f"{name}: entry {index} lacks the field '{key}'")


def _prediction_map(predictions: Mapping | Sequence, annotation_ids: Mapping[str, Any]) -> dict[Any, str]:
    """Map predictions onto annotation question ids, accepting int or str keys (JSON turns ints into str)."""
    if isinstance(predictions, Mapping):
        items = list(predictions.items())
    elif isinstance(predictions, Sequence) and not isinstance(predictions, str):
        items = []
        for index, record in enumerate(predictions):
            _require(record, ("question_id", "answer"), "predictions", index)
            items.append((record["question_id"], record["answer"]))
    else:
        raise ValueError("predictions must be a dict {question_id: answer} or a list of VQAv2 result records")
    mapped: dict[Any, str] = {}
    unknown = []
    for qid, answer in items:
        if str(qid) not in annotation_ids:
            unknown.append(qid)
            continue
        if not isinstance(answer, str):
            raise ValueError(f"prediction for question {qid!r} must be a string, got {type(answer).__name__}")
        key = annotation_ids[str(qid)]
        if key in mapped:
            raise ValueError(f"predictions hold question {qid!r} twice")
        mapped[key] = answer
    if unknown:
        raise ValueError(
            f"{len(unknown)} predicted question ids are not in the annotations, e.g. {unknown[:5]!r}"
        )
    return mapped


def evaluate_vqa(
    predictions: Mapping | Sequence,
    questions_json: str | os.PathLike | Mapping,
    annotations_json: str | os.PathLike | Mapping,
    subset: bool = False,
    normalize_references: bool = False,
) -> dict[str, Any]:
    """Official VQAv2 accuracy of `predictions` ({question_id: answer} or a list of result records).

    `questions_json` / `annotations_json` are paths or loaded VQAv2 JSON objects. Every annotated question must
    have a prediction unless `subset=True`, in which case only the predicted questions are scored. Returns
    {"overall", "per_question_type", "per_answer_type", "per_question", "num_questions"}, accuracies in percent.
    """
    questions, questions_name = _load_json(questions_json, "questions")
    annotations, annotations_name = _load_json(annotations_json, "annotations")
    question_ids = set()
    for index, record in enumerate(_records(questions, "questions", questions_name)):
        _require(record, ("question_id",), questions_name, index)
        question_ids.add(str(record["question_id"]))
    by_id: dict[Any, Mapping] = {}
    id_lookup: dict[str, Any] = {}
    for index, record in enumerate(_records(annotations, "annotations", annotations_name)):
        _require(record, ("question_id", "question_type", "answer_type", "answers"), annotations_name, index)
        qid = record["question_id"]
        if str(qid) not in question_ids:
            raise ValueError(f"{annotations_name}: question {qid!r} has no entry in {questions_name}")
        answers = record["answers"]
        if not isinstance(answers, list) or not answers:
            raise ValueError(f"{annotations_name}: question {qid!r} has no list of answers")
        for a_index, answer in enumerate(answers):
            _require(answer, ("answer",), f"{annotations_name} question {qid!r} answers", a_index)
        by_id[qid] = record
        id_lookup[str(qid)] = qid
    if not by_id:
        raise ValueError(f"{annotations_name}: no annotations to evaluate")
    predicted = _prediction_map(predictions, id_lookup)
    missing = [qid for qid in by_id if qid not in predicted]
    if missing and not subset:
        raise ValueError(
            f"{len(missing)} annotated questions have no prediction, e.g. {missing[:5]!r} "
            "(pass subset=True to score only the predicted questions)"
        )
    if not predicted:
        raise ValueError("no predictions to evaluate")
    per_question: dict[Any, float] = {}
    by_question_type: dict[str, list[float]] = {}
    by_answer_type: dict[str, list[float]] = {}
    for qid, answer in predicted.items():
        record = by_id[qid]
        accuracy = vqa_score(answer, [a["answer"] for a in record["answers"]], normalize_references)
        per_question[qid] = 100.0 * accuracy
        by_question_type.setdefault(str(record["question_type"]), []).append(100.0 * accuracy)
        by_answer_type.setdefault(str(record["answer_type"]), []).append(100.0 * accuracy)
    values = list(per_question.values())
    return {
        "overall": sum(values) / len(values),
        "per_question_type": {k: sum(v) / len(v) for k, v in sorted(by_question_type.items())},
        "per_answer_type": {k: sum(v) / len(v) for k, v in sorted(by_answer_type.items())},
        "per_question": per_question,
        "num_questions": len(values),
    }
