"""VQAv2 accuracy: official normalization, leave-one-out soft score, per-type aggregation, input errors."""

from __future__ import annotations

import json
import random

import pytest

from eval.vqa_accuracy import evaluate_vqa, normalize_answer, process_punctuation, vqa_score


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog.", "dog"),
        ("An Apple", "apple"),
        ("a cat\tand\na dog ", "cat and dog"),
        ("3.5", "3.5"),
        ("dr. who", "dr who"),
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not replaced by a space
        ("red,blue", "red blue"),  # no digit comma: replaced by a space
        ("red, blue", "red blue"),  # punctuation touching a space: deleted
        ("it's", "it s"),
        ("dont", "don’t"),  # the official table restores curly apostrophes
        ("cant", "can't"),
        ("Isnt", "isn’t"),
        ("yes!", "yes!"),  # '!' is not in the official punctuation list
        ("(left)", "left"),
        ("left/right", "left right"),
    ],
)
def test_normalize_answer_matches_official_rules(raw, expected):
    assert normalize_answer(raw) == expected


def test_period_strip_count_quirk_is_kept():
    # The official call passes re.UNICODE (32) as `count`: only the first 32 periods are stripped.
    assert process_punctuation("." * 40) == "." * 8


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(ValueError, match="string"):
        normalize_answer(3)


@pytest.mark.parametrize(
    ("matches", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)],
)
def test_vqa_score_leave_one_out(matches, expected):
    answers = ["blue"] * matches + ["red"] * (10 - matches)
    assert vqa_score("blue", answers) == pytest.approx(expected)


def test_vqa_score_normalizes_the_prediction():
    answers = ["2"] * 4 + ["3"] * 6
    assert vqa_score("Two.", answers) == pytest.approx(1.0)


def test_references_follow_the_official_processing():
    # Unanimous references are left untouched by the official script, so "yes." never matches "yes".
    assert vqa_score("yes", ["yes."] * 10) == 0.0
    assert vqa_score("yes", ["yes."] * 10, normalize_references=True) == 1.0
    # When annotators disagree their answers are punctuation-processed (but not digit/article-processed).
    assert vqa_score("yes", ["yes."] * 5 + ["no"] * 5) == pytest.approx(1.0)
    assert vqa_score("2", ["two"] * 5 + ["no"] * 5) == 0.0
    assert vqa_score("2", ["two"] * 5 + ["no"] * 5, normalize_references=True) == pytest.approx(1.0)


def _official_loop(prediction: str, answers: list[str]) -> float:
    """The official per-question loop over answer dicts with unique answer ids."""
    res = normalize_answer(prediction)
    records = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]
    if len({r["answer"] for r in records}) > 1:
        for r in records:
            r["answer"] = process_punctuation(r["answer"])
    accs = []
    for datum in records:
        others = [r for r in records if r != datum]
        accs.append(min(1, len([r for r in others if r["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_vqa_score_agrees_with_the_official_loop_on_random_answers():
    rng = random.Random(0)
    pool = ["yes", "no", "2", "two", "red.", "red", "a cat", "cat", "1,000", "1000"]
    for _ in range(300):
        answers = [rng.choice(pool) for _ in range(10)]
        prediction = rng.choice(pool + ["The Cat", "Two"])
        assert vqa_score(prediction, answers) == pytest.approx(_official_loop(prediction, answers))


def test_vqa_score_input_errors():
    with pytest.raises(ValueError, match="empty"):
        vqa_score("yes", [])
    with pytest.raises(ValueError, match="list"):
        vqa_score("yes", "yes")


def _fixture():
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (11, 12, 13)]}

    def ann(qid, qtype, atype, answers):
        return {
            "question_id": qid,
            "image_id": 1,
            "question_type": qtype,
            "answer_type": atype,
            "multiple_choice_answer": answers[0],
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
            ],
        }

    annotations = {
        "annotations": [
            ann(11, "what color", "other", ["red"] * 3 + ["blue"] * 7),  # "red" -> 0.9
            ann(12, "how many", "number", ["2"] * 10),  # "two" -> 1.0
            ann(13, "what color", "other", ["green"] * 10),  # "red" -> 0.0
        ]
    }
    return questions, annotations


def test_evaluate_vqa_aggregates_overall_and_per_type():
    questions, annotations = _fixture()
    result = evaluate_vqa({11: "Red", 12: "two", 13: "red"}, questions, annotations)
    assert result["num_questions"] == 3
    assert result["overall"] == pytest.approx(100 * (0.9 + 1.0 + 0.0) / 3)
    assert result["per_question_type"] == pytest.approx({"what color": 45.0, "how many": 100.0})
    assert result["per_answer_type"] == pytest.approx({"other": 45.0, "number": 100.0})
    assert result["per_question"] == pytest.approx({11: 90.0, 12: 100.0, 13: 0.0})


def test_evaluate_vqa_accepts_files_string_ids_and_result_records(tmp_path):
    questions, annotations = _fixture()
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    by_str = evaluate_vqa({"11": "red", "12": "2", "13": "green"}, tmp_path / "q.json", tmp_path / "a.json")
    records = [{"question_id": q, "answer": a} for q, a in ((11, "red"), (12, "2"), (13, "green"))]
    by_records = evaluate_vqa(records, str(tmp_path / "q.json"), str(tmp_path / "a.json"))
    assert by_str["overall"] == pytest.approx(100 * (0.9 + 1.0 + 1.0) / 3)
    assert by_records["overall"] == by_str["overall"]


def test_evaluate_vqa_missing_and_unknown_question_ids():
    questions, annotations = _fixture()
    with pytest.raises(ValueError, match=r"1 annotated questions have no prediction, e\.g\. \[13\]"):
        evaluate_vqa({11: "red", 12: "2"}, questions, annotations)
    partial = evaluate_vqa({11: "red", 12: "2"}, questions, annotations, subset=True)
    assert partial["num_questions"] == 2
    assert partial["overall"] == pytest.approx(95.0)
    with pytest.raises(ValueError, match=r"not in the annotations, e\.g\. \[99\]"):
        evaluate_vqa({11: "red", 12: "2", 13: "x", 99: "y"}, questions, annotations)


def test_evaluate_vqa_malformed_inputs(tmp_path):
    questions, annotations = _fixture()
    with pytest.raises(ValueError, match="questions file not found"):
        evaluate_vqa({}, tmp_path / "missing.json", annotations)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        evaluate_vqa({}, questions, tmp_path / "bad.json")
    broken = {"annotations": [dict(annotations["annotations"][0])]}
    del broken["annotations"][0]["answer_type"]
    with pytest.raises(ValueError, match="entry 0 lacks the field 'answer_type'"):
        evaluate_vqa({11: "red"}, questions, broken)
    orphan = {"annotations": annotations["annotations"]}
    with pytest.raises(ValueError, match="question 11 has no entry"):
        evaluate_vqa({11: "red"}, {"questions": []}, orphan)
    with pytest.raises(ValueError, match="must be a string"):
        evaluate_vqa({11: 5, 12: "2", 13: "x"}, questions, annotations)
