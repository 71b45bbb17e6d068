"""Caption metrics: PTB-like tokenization, hand-computed CIDEr-D/BLEU values, agreement with pycocoevalcap."""

from __future__ import annotations

import importlib.util
import json
import math
import random

import pytest

from eval.caption_metrics import bleu, cider_d, evaluate_captions, ptb_tokenize

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A man riding a horse.", "a man riding a horse"),
        ("A dog's bone, on the grass!", "a dog 's bone on the grass"),
        ("Don't stop -- it's 3.5 or 1,000 dogs?", "do n't stop it 's 3.5 or 1,000 dogs"),
        ('A "red" (small) well-known cube; at 10:30...', "a red small well-known cube at 10:30"),
        ("Flags of the U.S. and dogs' toys", "flags of the u.s. and dogs toys"),
        ("He cannot see\nthe cat", "he can not see the cat"),
    ],
)
def test_ptb_tokenize(raw, expected):
    assert ptb_tokenize(raw) == expected
    assert ptb_tokenize(expected) == expected  # idempotent on tokenized text


def test_cider_identical_captions_score_five_with_two_word_sentences():
    # Unigram and bigram cosines are 1, trigram/4-gram vectors are empty: 10 * (1 + 1 + 0 + 0) / 4.
    score, per_id = cider_d({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
    assert per_id == pytest.approx({1: 5.0, 2: 5.0})
    assert score == pytest.approx(5.0)


def test_cider_clipping_and_length_penalty():
    # Every n-gram has df 1 in a 2-image corpus, so every weight is tf * ln 2.
    # Unigrams: hyp a:3w b:w, ref a:w b:w -> clipped dot 2w^2 / (sqrt(10) w * sqrt(2) w).
    # Bigrams: hyp (a a):2w (a b):w, ref (a b):w -> w^2 / (sqrt(5) w * w). Higher orders: no overlap.
    # Lengths (bigram counts) 3 vs 1 -> penalty exp(-4 / 72).
    _, per_id = cider_d({1: "a a a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
    expected = 10 * math.exp(-4 / 72) * (2 / math.sqrt(20) + 1 / math.sqrt(5)) / 4
    assert per_id[1] == pytest.approx(expected, rel=1e-12)
    unclipped = 10 * math.exp(-4 / 72) * (4 / math.sqrt(20) + 2 / math.sqrt(5)) / 4
    assert per_id[1] < unclipped


def test_cider_length_penalty_on_a_prefix():
    # All hypothesis k-grams occur once in the reference: cosine sqrt((5 - k) / (9 - k)); lengths differ by 4.
    _, per_id = cider_d({1: "a b c d", 2: "z y"}, {1: ["a b c d e f g h"], 2: ["z y"]})
    cosines = [math.sqrt((5 - k) / (9 - k)) for k in range(1, 5)]
    assert per_id[1] == pytest.approx(10 * math.exp(-16 / 72) * sum(cosines) / 4, rel=1e-12)


def test_cider_document_frequency_effect():
    # Hypothesis "a y" vs reference "a x": y is unseen (df 0 -> treated as 1), bigrams do not overlap.
    # When x is in every image's references its idf is 0, the reference norm shrinks and the score rises.
    _, common = cider_d({1: "a y", 2: "b x"}, {1: ["a x"], 2: ["b x"]})
    assert common[1] == pytest.approx(10 * (1 / math.sqrt(2)) / 4, rel=1e-12)
    _, rare = cider_d({1: "a y", 2: "b z"}, {1: ["a x"], 2: ["b z"]})
    assert rare[1] == pytest.approx(10 * 0.5 / 4, rel=1e-12)


def test_cider_averages_over_references():
    _, one = cider_d({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
    _, two = cider_d({1: "a b", 2: "c d"}, {1: ["a b", "e f"], 2: ["c d"]})
    # The second reference shares nothing with the hypothesis: the mean over references halves the score.
    assert two[1] == pytest.approx(one[1] / 2)


def test_bleu_brevity_penalty_and_closest_reference():
    scores, per_id = bleu({1: "a b c"}, {1: ["a b c d e", "a b c d e f g h"]})
    penalty = math.exp(1 - 5 / 3)
    assert scores[:3] == pytest.approx([penalty] * 3, rel=1e-8)
    # No 4-gram is possible: the toolkit's smoothing gives (1e-15 / 1e-9) ** (1/4) instead of 0.
    assert scores[3] == pytest.approx(penalty * (1e-15 / 1e-9) ** 0.25, rel=1e-6)
    assert per_id[1] == pytest.approx(scores)
    # A tie in distance picks the shorter reference (3 < 5), so a 4-word hypothesis gets no penalty.
    tie, _ = bleu({1: "a b c d"}, {1: ["a b c", "a b c d e"]})
    assert tie[0] == pytest.approx(1.0, rel=1e-8)


def test_bleu_is_corpus_level():
    # Image 1 is short (2 vs 4 words), image 2 is long (6 vs 4): totals are equal, so no corpus penalty.
    candidates = {1: "a b", 2: "x y z w v u"}
    references = {1: ["a b c d"], 2: ["x y z w"]}
    scores, per_id = bleu(candidates, references)
    assert scores[0] == pytest.approx(6 / 8, rel=1e-8)
    assert per_id[1][0] == pytest.approx(math.exp(1 - 4 / 2), rel=1e-8)
    assert per_id[2][0] == pytest.approx(4 / 6, rel=1e-8)
    assert scores[1] == pytest.approx(math.sqrt(6 / 8 * 4 / 6), rel=1e-8)  # bigrams: 1 + 3 correct of 1 + 5


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same ids"):
        cider_d({1: "a"}, {2: ["a"]})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({1: "a"}, {1: []})
    with pytest.raises(ValueError, match="one string"):
        cider_d({1: ["a"]}, {1: ["a"]})
    with pytest.raises(ValueError, match="no captions"):
        bleu({}, {})


def _random_corpus(seed: int, images: int = 50):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(30)] + ["a", "the", "dog", "red", "on"]
    candidates, references = {}, {}
    for image in range(images):
        references[image] = [
            " ".join(rng.choice(vocabulary) for _ in range(rng.randint(3, 12)))
            for _ in range(rng.randint(1, 5))
        ]
        candidates[image] = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12)))
    candidates[0] = references[0][0]  # one exact match
    return candidates, references


@pytest.mark.skipif(
    importlib.util.find_spec("pycocoevalcap") is None,
    reason="pycocoevalcap (dev extra) is not installed: the agreement check needs its CiderScorer/BleuScorer",
)
def test_agreement_with_pycocoevalcap():
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    candidates, references = _random_corpus(seed=0)
    cider_scorer = CiderScorer(n=4, sigma=6.0)
    bleu_scorer = BleuScorer(n=4)
    for image in candidates:
        cider_scorer += (candidates[image], references[image])
        bleu_scorer += (candidates[image], references[image])
    ref_cider, ref_cider_per_image = cider_scorer.compute_score()
    ref_bleu, ref_bleu_per_image = bleu_scorer.compute_score(option="closest", verbose=0)

    cider, cider_per_id = cider_d(candidates, references)
    assert cider == pytest.approx(float(ref_cider), abs=1e-6)
    for index, image in enumerate(candidates):
        assert cider_per_id[image] == pytest.approx(float(ref_cider_per_image[index]), abs=1e-6)
    scores, bleu_per_id = bleu(candidates, references)
    assert scores == pytest.approx(ref_bleu, abs=1e-6)
    for index, image in enumerate(candidates):
        assert bleu_per_id[image] == pytest.approx([ref_bleu_per_image[k][index] for k in range(4)], abs=1e-6)
    assert 0.0 < cider and 0.0 < scores[3] < scores[0] < 1.0  # a fixture with non-trivial values


def _coco_file(tmp_path, references):
    annotations = [
        {"image_id": image, "id": 100 * image + k, "caption": caption}
        for image, captions in references.items()
        for k, caption in enumerate(captions)
    ]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": [{"id": i} for i in references], "annotations": annotations}))
    return path


def test_evaluate_captions_matches_the_metric_functions(tmp_path):
    references = {1: ["A dog runs.", "The dog is running!"], 2: ["A red cube.", "Red cube on grass."]}
    path = _coco_file(tmp_path, references)
    predictions = [{"image_id": 1, "caption": "A dog running."}, {"image_id": 2, "caption": "A red cube"}]
    result = evaluate_captions(predictions, path)
    cider, per_id = cider_d({1: "A dog running.", 2: "A red cube"}, references)
    scores, _ = bleu({1: "A dog running.", 2: "A red cube"}, references)
    assert result["CIDEr-D"] == pytest.approx(cider)
    assert [result[f"BLEU-{k}"] for k in range(1, 5)] == pytest.approx(scores)
    assert result["per_image"][1]["CIDEr-D"] == pytest.approx(per_id[1])
    assert result["num_images"] == 2
    assert evaluate_captions({"1": "a dog running", "2": "a red cube"}, path)["CIDEr-D"] == pytest.approx(
        cider
    )


def test_evaluate_captions_errors(tmp_path):
    path = _coco_file(tmp_path, {1: ["a dog"], 2: ["a cat"]})
    with pytest.raises(ValueError, match=r"1 annotated images have no predicted caption, e\.g\. \[2\]"):
        evaluate_captions({1: "a dog"}, path)
    assert evaluate_captions({1: "a dog"}, path, subset=True)["num_images"] == 1
    with pytest.raises(ValueError, match=r"no reference captions, e\.g\. \[7\]"):
        evaluate_captions({1: "a dog", 2: "a cat", 7: "x"}, path)
    with pytest.raises(ValueError, match="COCO captions file not found"):
        evaluate_captions({1: "a"}, tmp_path / "missing.json")
    with pytest.raises(ValueError, match="annotation 0 needs the fields"):
        evaluate_captions({1: "a"}, {"annotations": [{"image_id": 1}]})
