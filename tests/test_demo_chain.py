"""The whole demo chain on a micro budget: every stage runs, the report is written, and a re-run reuses stages."""

from __future__ import annotations

import json

from mllm.console import main

MICRO = ["--scenes", "240", "--teacher-steps", "4", "--tokenizer-steps", "3", "--probe-steps", "20", "--stage1-steps", "2",
         "--stage2-steps", "2", "--batch-size", "4", "--eval-limit", "4", "--threads", "1", "--curve-every", "1",
         "--t2i-steps", "2", "--curve-t2i-prompts", "3"]  # fmt: skip


def test_demo_chain_runs_every_stage_and_reuses_them(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *MICRO]) == 0
    stages = ["data", "validate", "teacher", "tokenizer", "tokenizer_eval", "encode", "text_tokenizer",
              "mllm_stage1", "mllm_stage2", "mllm_t2i", "evaluate", "report"]  # fmt: skip
    for stage in stages:
        assert (out / "stages" / f"{stage}.json").exists(), stage
    # The trained pieces load through their public entry points.
    from mllm.checkpoint import load_checkpoint
    from tokenizer.modeling import DualTokenModel

    model, processor = load_checkpoint(out / "mllm")
    assert processor.image_tokenizer is not None
    assert (
        DualTokenModel.from_pretrained(out / "tokenizer").config.codebook_size == model.config.codebook_size
    )
    # The text-to-image stage continues from stage 2 with the semantic codes no longer fed back, and its model is
    # the one evaluated.
    final, _ = load_checkpoint(out / "mllm_t2i")
    assert (model.config.output_semantic_dropout, final.config.output_semantic_dropout) == (0.0, 1.0)
    evaluated = json.loads((out / "stages" / "evaluate.json").read_text())["summary"]["model"]
    assert evaluated == str(out / "mllm_t2i")
    t2i_stage = json.loads((out / "stages" / "mllm_t2i.json").read_text())["summary"]
    assert t2i_stage["steps"] == 2 and t2i_stage["mixture"]["prompt_repeat"] > 1
    report = (out / "REPORT.md").read_text()
    for heading in ("## Tokenizer", "## VQA", "## Captions", "## Multi-turn chat", "## Text-to-image"):
        assert heading in report
    assert (out / "eval_tokenizer" / "reconstructions.png").exists() and "reconstructions.png" in report
    probe = json.loads((out / "eval_tokenizer" / "probe.json").read_text())
    assert probe["split"] == "train" and probe["images"] == 216 and {"pixel", "semantic"} <= set(probe)
    assert probe["steps"] == 20  # --probe-steps reaches the probes
    assert "What the codes carry" in report and "| semantic |" in report
    vqa = json.loads((out / "eval" / "vqa_metrics.json").read_text())
    assert vqa["all"]["num_questions"] == 4 and vqa["shuffled_images"]["num_questions"] == 4
    assert "| all, shuffled images (control) | 4 |" in report
    # Each question's form, with its accuracy on real and on shuffled images.
    forms = vqa["all"]["per_question_form"]
    assert sum(f["questions"] for f in forms.values()) == 4
    assert (
        "| question form | questions | accuracy | shuffled images | wrong: another object's / absent |"
        in report
    )
    for form, m in forms.items():
        shuffled = vqa["shuffled_images"]["per_question_form"].get(form, {}).get("accuracy")
        assert f"| {form} | {m['questions']} | {m['accuracy']:.1f} | " in report and shuffled is not None
    # VQA against training minutes: a point after each stage-2 step, on 4 validation questions, minutes counted
    # from the end of stage 1 onwards.
    stage1_minutes = json.loads((out / "stages" / "mllm_stage1.json").read_text())["seconds"] / 60
    curve = json.loads((out / "stages" / "mllm_stage2.json").read_text())["summary"]["vqa_curve"]
    assert [p["step"] for p in curve] == [1, 2]
    assert stage1_minutes < curve[0]["train_minutes"] < curve[1]["train_minutes"]
    written = json.loads((out / "mllm" / "vqa_curve" / "vqa_curve.json").read_text())
    assert written["split"] == str(out / "data" / "val")
    assert [p["num_questions"] for p in written["points"]] == [4, 4]
    assert "## VQA against MLLM training minutes" in report and (out / "eval" / "vqa_curve.png").exists()
    # The text-to-image stage's curve points also draw 3 validation prompts (stage 2's answer VQA only) and
    # continue the clock.
    assert not any("t2i" in p for p in written["points"])
    t2i_curve = json.loads((out / "mllm_t2i" / "vqa_curve" / "vqa_curve.json").read_text())["points"]
    assert [p["step"] for p in t2i_curve] == [1, 2] and all(p["t2i"]["num_prompts"] == 3 for p in t2i_curve)
    assert written["points"][-1]["train_minutes"] < t2i_curve[0]["train_minutes"]
    assert "| text-to-image stage | 2 |" in report and "T2I overall" in report
    fd = json.loads((out / "eval" / "t2i_metrics.json").read_text())["fd"]
    assert fd["generated"] == 4 and fd["value"] >= 0 and "FD of 4 generated" in report
    reference = json.loads((out / "eval" / "t2i_metrics.json").read_text())["reference"]
    assert reference["real"]["num_samples"] == 4 and "| reference: the prompts' own images | 4 |" in report
    capsys.readouterr()
    # A second run reuses every finished stage; --from reruns the report only.
    assert main(["demo", "--out", str(out), *MICRO, "--from", "report"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done") == len(stages) - 1

    # --ablations adds the same-budget ablations after the finished chain and their tables to the report.
    assert main(["demo", "--out", str(out), *MICRO, "--ablations"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("already done") == len(stages)
    understanding, _ = load_checkpoint(out / "ablations" / "semantic_pixel_tokens" / "mllm")
    pixel_only, _ = load_checkpoint(out / "ablations" / "pixel_head_only" / "mllm")
    assert (
        understanding.config.understanding_tokens == "semantic+pixel"
        and understanding.config.use_semantic_head
    )
    assert not pixel_only.config.use_semantic_head and pixel_only.semantic_head is None
    table = json.loads((out / "ablations" / "tokenizer" / "ablation.json").read_text())
    assert set(table["variants"]) == {"dualtoken", "same_layer", "recon_only", "semantic_only"}
    assert table["variants"]["dualtoken"]["run"] == str(out / "tokenizer")
    report = (out / "REPORT.md").read_text()
    ablations = report[report.index("## Ablations") :]
    for heading in ("### Understanding tokens", "### Generation heads", "### Tokenizer"):
        assert heading in ablations
    assert "pixel head only" in ablations and "semantic + pixel" in ablations and "same layer" in ablations


def test_a_summary_stage_runs_again_when_an_earlier_stage_ran(tmp_path, monkeypatch):
    import eval.demo as demo

    calls: list[str] = []

    def stage(name: str, summary: bool = False) -> demo.Stage:
        return demo.Stage(name, name, lambda ctx: calls.append(name) or {"stage": name}, summary=summary)

    monkeypatch.setattr(demo, "STAGES", [stage("a"), stage("b"), stage("report", summary=True)])
    settings = demo.DemoSettings()
    demo.run_demo(tmp_path, settings)
    assert calls == ["a", "b", "report"]
    demo.run_demo(tmp_path, settings)  # nothing changed: everything is reused
    assert calls == ["a", "b", "report"]
    (tmp_path / "stages" / "b.json").unlink()  # b reruns, so the report built from it must too; a stays
    demo.run_demo(tmp_path, settings)
    assert calls == ["a", "b", "report", "b", "report"]
