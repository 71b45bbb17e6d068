"""The demo's human-readable report: `runs/demo/REPORT.md` with metric tables, image grids and training curves.

Everything is read from what the demo stages wrote (stage summaries, `eval/*_metrics.json`, per-sample JSONL,
the trainers' `log_history.json`); the report adds pictures: training curves (matplotlib, Agg backend) and a grid
of generated images with the scene parser's verdict under each. Paths in the markdown are relative to the run
directory so the report renders wherever the directory is moved.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_recipes.atomic_io import atomic_save_figure, atomic_save_png, atomic_write_text

T2I_TAG_ORDER = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ pictures
def plot_training_curves(histories: Mapping[str, list[dict]], out_png: Path) -> Path | None:
    """One panel per logged loss (total, text, pixel, semantic), one line per training stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "loss_text", "loss_pixel", "loss_semantic"]
    present = [k for k in keys if any(k in row for rows in histories.values() for row in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    offset = 0
    for stage, rows in histories.items():
        steps = [row["step"] + offset for row in rows if "step" in row]
        for ax, key in zip(axes[0], present):
            points = [(row["step"] + offset, row[key]) for row in rows if key in row and "step" in row]
            if points:
                ax.plot(*zip(*points), label=stage)
        offset = max(steps, default=offset)
    for ax, key in zip(axes[0], present):
        ax.set_title(key)
        ax.set_xlabel("step (stages back to back)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return atomic_save_figure(fig, out_png)


def verdict_grid(
    image_dir: Path,
    verdicts: Sequence[Mapping[str, Any]],
    samples: Mapping[str, Any],
    out_png: Path,
    per_tag: int = 4,
) -> Path | None:
    """Generated images, `per_tag` per T2I category (rows), each with its prompt and the parser's verdict."""
    files = {str(row["prompt_id"]): row["files"] for row in samples.values()}
    by_tag: dict[str, list[tuple[Path, Mapping[str, Any]]]] = {}
    seen_files: set[str] = set()
    for verdict in verdicts:
        names = [n for n in files.get(str(verdict["prompt_id"]), []) if n not in seen_files]
        if not names:
            continue
        seen_files.add(names[0])
        if len(by_tag.setdefault(verdict["tag"], [])) < per_tag:
            by_tag[verdict["tag"]].append((image_dir / names[0], verdict))
    tags = [t for t in T2I_TAG_ORDER if t in by_tag]
    if not tags:
        return None
    cell, text_h, scale = 160, 44, 2
    canvas = Image.new("RGB", (per_tag * cell, len(tags) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, tag in enumerate(tags):
        for c, (path, verdict) in enumerate(by_tag[tag]):
            image = Image.open(path).convert("RGB")
            side = min(cell - 8, image.width * scale)
            x, y = c * cell + (cell - side) // 2, r * (cell + text_h) + 4
            canvas.paste(image.resize((side, side), Image.NEAREST), (x, y))
            mark, color = ("PASS", (0, 130, 0)) if verdict["satisfied"] else ("FAIL", (190, 0, 0))
            prompt = verdict["prompt"] if len(verdict["prompt"]) <= 26 else verdict["prompt"][:25] + "…"
            draw.text((c * cell + 6, y + side + 2), f"{mark} [{tag}]", fill=color)
            draw.text((c * cell + 6, y + side + 16), prompt, fill=(0, 0, 0))
    return atomic_save_png(canvas, out_png)


# ------------------------------------------------------------------------------------------ sections
def _stage_times(run: Path) -> str:
    rows = []
    for marker in sorted((run / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime):
        payload = _read_json(marker)
        rows.append((marker.stem, float(payload.get("seconds", 0.0)), float(payload.get("cpu_seconds", 0.0))))
    total = ("**total**", sum(row[1] for row in rows), sum(row[2] for row in rows))
    return _table(
        ("stage", "wall seconds", "CPU seconds"),
        [(name, f"{wall:.0f}", f"{cpu:.0f}") for name, wall, cpu in [*rows, total]],
    )


def _tokenizer_section(run: Path, summaries: Mapping[str, dict]) -> list[str]:
    lines = ["## Tokenizer", ""]
    teacher = summaries.get("teacher", {}).get("zero_shot")
    metrics = _read_json(run / "eval_tokenizer" / "metrics.json") or summaries.get("tokenizer_eval", {}).get(
        "metrics"
    )
    if teacher:
        lines += [f"Teacher zero-shot (test split, single-object images): `{json.dumps(teacher)}`", ""]
    if metrics:
        flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        lines += [_table(("metric", "value"), [(k, f"{v:.4g}") for k, v in sorted(flat.items())]), ""]
    if (run / "eval_tokenizer" / "reconstructions.png").exists():
        lines += ["Originals and reconstructions (test split): ![](eval_tokenizer/reconstructions.png)", ""]
    probe = _read_json(run / "eval_tokenizer" / "probe.json")
    if probe:
        rows = [
            (branch, *(_pct(100 * probe[branch][k]) for k in ("cell_color", "cell_shape", "cell_empty", "token_row", "token_row_chance")))
            for branch in ("pixel", "semantic")
            if branch in probe
        ]  # fmt: skip
        lines += [
            f"What the codes carry (`dualtoken tokenizer probe`: MLP probes fitted on {probe['images'] - probe['test_images']} "
            f"{probe['split']} images, scored on {probe['test_images']} others): the object in each scene cell from "
            "the latents of the cell's tokens, and a token's own grid row from its latent alone. This bounds what "
            "the MLLM can read from its visual input (accuracy, %).",
            "",
            _table(("codes", "cell color", "cell shape", "cell empty", "token row", "row chance"), rows),
            "",
        ]  # fmt: skip
    return lines


def _ablation_section(run: Path) -> list[str]:
    """The `dualtoken demo --ablations` results next to the main run's (same data, budget and seed)."""
    lines = []
    understanding = _read_json(run / "ablations" / "semantic_pixel_tokens" / "eval" / "vqa_metrics.json")
    main_vqa = _read_json(run / "eval" / "vqa_metrics.json")
    if understanding and main_vqa:
        rows = [
            (name, *(_pct(m[part]["overall"]) if m.get(part) else "–" for part in ("all", "seen", "heldout")))
            for name, m in (("semantic (main run)", main_vqa), ("semantic + pixel", understanding))
        ]
        lines += [
            "### Understanding tokens (VQA accuracy)",
            "",
            _table(("tokens", "all", "seen", "held-out"), rows),
            "",
        ]
    generation = _read_json(run / "ablations" / "pixel_head_only" / "eval" / "t2i_metrics.json")
    main_t2i = _read_json(run / "eval" / "t2i_metrics.json")
    if generation and main_t2i:
        rows = []
        for name, m in (("pixel + semantic heads (main run)", main_t2i), ("pixel head only", generation)):
            per_tag = m["all"].get("per_tag", {})
            rows.append(
                (name, _pct(100 * m["all"]["overall"]), *(_pct(100 * per_tag[t]) if t in per_tag else "–" for t in T2I_TAG_ORDER))
            )  # fmt: skip
        lines += ["### Generation heads (text-to-image, scene parser)", "",
                  _table(("heads", "overall", *T2I_TAG_ORDER), rows), ""]  # fmt: skip
    tokenizer = run / "ablations" / "tokenizer" / "ablation.md"
    if tokenizer.exists():
        lines += [
            "### Tokenizer (same budget as the main DualToken run)",
            "",
            tokenizer.read_text(encoding="utf-8"),
            "",
        ]
    return ["## Ablations", "", *lines] if lines else []


def _vqa_curve_section(run: Path) -> list[str]:
    """VQA (and, where measured, T2I) on the validation split against MLLM training minutes, measured during stage 2
    and the text-to-image stage (`--curve-every`, `--curve-t2i-prompts`)."""
    from eval.learning_curve import CURVE_FILE, QUESTION_TYPES, plot_vqa_curves, read_curve

    stages = {"stage 2": run / "mllm", "text-to-image stage": run / "mllm_t2i"}
    curves = {name: read_curve(folder / "vqa_curve" / CURVE_FILE) for name, folder in stages.items()}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return []
    plot = plot_vqa_curves(curves, run / "eval" / "vqa_curve.png")
    with_t2i = any("t2i" in p for points in curves.values() for p in points)
    rows = []
    for name, points in curves.items():
        for p in points:
            t2i = p.get("t2i") or {}
            rows.append(
                (
                    name,
                    p["step"],
                    f"{p['train_minutes']:.1f}",
                    _pct(p["overall"]),
                    *(_pct(p["per_question_type"].get(t)) for t in QUESTION_TYPES),
                    *(
                        (_pct(t2i.get("overall")), _pct(t2i.get("per_tag", {}).get("single_object")))
                        if with_t2i
                        else ()
                    ),
                )
            )
    first = next(iter(curves.values()))[0]
    t2i_text = ""
    if with_t2i:
        prompts = next(p["t2i"]["num_prompts"] for points in curves.values() for p in points if "t2i" in p)
        t2i_text = f" and {prompts} validation text-to-image prompts drawn and checked by the scene parser"
    lines = [
        "## VQA against MLLM training minutes (validation split)",
        "",
        f"{first['num_questions']} validation questions answered{t2i_text} every few steps by the model being "
        "trained; minutes are MLLM training wall time (stage 1 included, the evaluations not).",
        "",
        _table(
            (
                "stage",
                "step",
                "MLLM minutes",
                "VQA overall",
                *QUESTION_TYPES,
                *(("T2I overall", "T2I single object") if with_t2i else ()),
            ),
            rows,
        ),  # fmt: skip
        "",
    ]
    if plot:
        lines += ["![VQA against MLLM training minutes](eval/vqa_curve.png)", ""]
    return lines


def _vqa_section(run: Path) -> list[str]:
    metrics = _read_json(run / "eval" / "vqa_metrics.json")
    if not metrics:
        return []
    lines = ["## VQA (VQAv2 accuracy, test split)", ""]
    types = sorted(metrics["all"]["per_question_type"])

    def row(name: str, m: dict) -> tuple:
        return (
            name,
            m["num_questions"],
            _pct(m["overall"]),
            *(_pct(m["per_question_type"].get(t)) for t in types),
        )

    rows = [row(part, metrics[part]) for part in ("all", "seen", "heldout") if metrics.get(part)]
    control = metrics.get("shuffled_images")
    if control:
        rows.append(row("all, shuffled images (control)", control))
    lines += [_table(("combinations", "questions", "overall", *types), rows), ""]
    if control:
        lines += [
            "The control row asks the same questions with another test image in place of each question's own: "
            "what a question type keeps there comes from the question alone, and only the gap to the `all` row "
            "is read from the image.",
            "",
        ]
    forms = metrics["all"].get("per_question_form")
    if forms:
        shuffled = (control or {}).get("per_question_form", {})
        lines += [
            _table(
                (
                    "question form",
                    "questions",
                    "accuracy",
                    "shuffled images",
                    "wrong: another object's / absent",
                ),
                [
                    (
                        form,
                        m["questions"],
                        _pct(m["accuracy"]),
                        _pct(shuffled.get(form, {}).get("accuracy")),
                        f"{m['wrong_another_object']} / {m['wrong_absent']}" if "wrong_absent" in m else "",
                    )
                    for form, m in forms.items()
                ],
            ),  # fmt: skip
            "",
            "By how a question names its object: by place needs the cells at a place, by an attribute the cells "
            "that show it; existence and filtered counts need both attributes of one object. The last column "
            "splits wrong color, shape and position answers: another object's (the model looked at the wrong "
            "object) or one the image does not hold (it misread the object).",
            "",
        ]
    examples = _read_jsonl(run / "eval" / "vqa_predictions.jsonl", limit=8)
    if examples:
        lines += [
            _table(
                ("image", "question", "model answer"),
                [
                    (f"![](data/test/images/{r['image_id']:07d}.png)", r["question"], f"`{r['answer']}`")
                    for r in examples
                ],
            ),
            "",
        ]
    return lines


def _caption_chat_section(run: Path) -> list[str]:
    lines = []
    captions = _read_json(run / "eval" / "caption_metrics.json")
    if captions:
        lines += ["## Captions", "", _table(("images", "CIDEr-D", "BLEU-4"),
                  [(captions["num_images"], f"{captions['CIDEr-D']:.3f}", f"{captions['BLEU-4']:.3f}")]), ""]  # fmt: skip
        examples = _read_jsonl(run / "eval" / "caption_predictions.jsonl", limit=4)
        lines += [
            _table(
                ("image", "caption"),
                [(f"![](data/test/images/{r['image_id']:07d}.png)", r["caption"]) for r in examples],
            ),
            "",
        ]
    chat = _read_json(run / "eval" / "chat_metrics.json")
    if chat:
        lines += ["## Multi-turn chat (reply accuracy per turn, true history given)", ""]
        lines += [_table(("turn", "accuracy"), [(t, _pct(v)) for t, v in chat["per_turn"].items()]), ""]
        lines += [f"Overall: {_pct(chat['overall'])} over {chat['num_turns']} turns.", ""]
        examples = _read_jsonl(run / "eval" / "chat_predictions.jsonl", limit=6)
        lines += [_table(("turn", "question", "reference", "model"),
                         [(r["turn"] + 1, r["question"].replace("<image>\n", ""), r["reference"], r["reply"])
                          for r in examples]), ""]  # fmt: skip
    return lines


def _t2i_section(run: Path) -> list[str]:
    metrics = _read_json(run / "eval" / "t2i_metrics.json")
    if not metrics:
        return []
    lines = ["## Text-to-image (GenEval-style, verified by the scene parser)", ""]
    reference = metrics.get("reference") or {}
    parts = [(part, metrics.get(part)) for part in ("all", "seen", "heldout")]
    parts += [("reference: the prompts' own images", reference.get("real")),
              ("reference: their DualToken reconstructions", reference.get("reconstructed"))]  # fmt: skip
    rows = []
    for label, summary in parts:
        if summary:
            per_tag = summary.get("per_tag", {})
            rows.append(
                (label, summary.get("num_samples", "–"), _pct(100 * summary["overall"]),
                 *(_pct(100 * per_tag[t]) if t in per_tag else "–" for t in T2I_TAG_ORDER))
            )  # fmt: skip
    lines += [_table(("prompts", "samples", "overall", *T2I_TAG_ORDER), rows), ""]
    if reference:
        lines += ["The reference rows run the same check on the data itself: the reconstructed row is the most a "
                  "generator can score through this tokenizer's pixel decoder.", ""]  # fmt: skip
    lines += _t2i_diagnostics_lines(reference)
    fd = metrics.get("fd")
    if fd:
        lines += [f"FD of {fd['generated']} generated vs {fd['real']} real test images: **{fd['value']:.1f}** "
                  f"({fd['features']}).", ""]  # fmt: skip
    samples = {str(r["prompt_id"]): r for r in _read_jsonl(run / "eval" / "t2i_samples.jsonl")}
    verdicts = _read_jsonl(run / "eval" / "t2i_verdicts.jsonl")
    grid = verdict_grid(run / "eval" / "t2i_images", verdicts, samples, run / "eval" / "t2i_grid.png")
    if grid:
        lines += ["![generated images with verdicts](eval/t2i_grid.png)", ""]
    return lines


def _t2i_diagnostics_lines(reference: Mapping[str, Any]) -> list[str]:
    """Per-depth image losses under controlled inputs, and per-depth code entropies (`eval.t2i_diagnostics`)."""
    lines: list[str] = []
    use = reference.get("caption_use")
    if use:
        labels = {"own_caption": "own caption", "shifted_caption": "another prompt's caption",
                  "zero_state": "LLM state zeroed", "shuffled_state": "LLM state shuffled across cells"}  # fmt: skip
        rows = [
            (head, labels[condition], *(f"{value:.6f}" for value in values))
            for head, per in use.items()
            for condition, values in per.items()
        ]
        depth = max(len(values) for per in use.values() for values in per.values())
        lines += ["Where the caption is lost: the model's image cross-entropy on the prompts' own images (nats per "
                  "code, per residual depth). Own = another caption: the caption does not reach the depth heads; "
                  "own = zeroed state: the heads do not use the LLM at all.", "",
                  _table(("head", "input", *(f"depth {d}" for d in range(depth))), rows), ""]  # fmt: skip
    entropy = reference.get("code_entropy")
    if entropy:
        labels = {"marginal": "marginal", "given_place": "given the cell's place",
                  "given_content": "given what the cell shows", "given_place_and_content": "given both"}  # fmt: skip
        heads = {k: v for k, v in entropy.items() if isinstance(v, dict)}
        rows = [
            (head, labels[key], *(f"{value:.3f}" for value in values))
            for head, per in heads.items()
            for key, values in per.items()
        ]
        depth = max(len(values) for per in heads.values() for values in per.values())
        lines += [f"How much of each depth the scene predicts: plug-in code entropy (nats) over {entropy['cells']:,} "
                  "cells of those images (biased low where the condition has many values). The gap between the "
                  "marginal and the conditional rows is what a caption-and-position-aware generator can remove "
                  "from that depth's loss.", "",
                  _table(("head", "entropy", *(f"depth {d}" for d in range(depth))), rows), ""]  # fmt: skip
    return lines


def write_report(run: str | os.PathLike, summaries: Mapping[str, dict]) -> Path:
    run = Path(run)
    histories = {}
    for stage in ("mllm_stage1", "mllm", "mllm_t2i"):
        history = _read_json(run / stage / "log_history.json")
        if history:
            histories[stage] = history
    curves = plot_training_curves(histories, run / "eval" / "training_curves.png") if histories else None
    data = summaries.get("data", {})
    lines = [
        "# DualToken-MLLM demo report (tiny preset, shapes world)",
        "",
        f"Dataset: `{json.dumps(data.get('splits', {}))}` scenes; held-out color-shape pairs "
        f"`{data.get('heldout_pairs')}` appear only in the test split.",
        "",
        "## Stages",
        "",
        _stage_times(run),
        "",
        *_tokenizer_section(run, summaries),
        *_vqa_section(run),
        *_vqa_curve_section(run),
        *_caption_chat_section(run),
        *_t2i_section(run),
        *_ablation_section(run),
    ]
    if curves:
        lines += ["## Training curves", "", "![training curves](eval/training_curves.png)", ""]
    return atomic_write_text(run / "REPORT.md", "\n".join(lines) + "\n")
