"""The end-to-end demo on the embedded default: every stage of the chain, each reused when already finished.

`dualtoken demo --out runs/demo` runs the stages in order. A stage writes its outputs under the run directory and,
last, a marker `stages/<name>.json` with its summary; a re-run skips every stage whose marker exists, so an
interrupted demo continues where it stopped. The training stages (teacher, tokenizer, both MLLM stages) checkpoint as
they go, and a stage that was interrupted continues from its newest checkpoint (to the result an uninterrupted run
reaches) instead of from its start. `--from STAGE` forces that stage and all later ones to run again from scratch.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_recipes.atomic_io import atomic_write_json, atomic_write_text


@dataclass
class DemoSettings:
    """Budget of the demo; the defaults are what `make demo` runs on 2 CPU cores (20.7-26.1 minutes from a fresh clone,
    install included, measured on the development machine)."""

    scenes: int = 12000
    image_size: int = 64
    seed: int = 0
    teacher_steps: int = 600
    # Weight of the teacher's per-patch class loss (`TeacherSettings.dense_loss_weight`; 0: the sigmoid loss alone).
    teacher_dense_loss_weight: float = 0.0
    tokenizer_steps: int | None = None  # None: the tokenizer trainer's own default
    text_vocab_size: int = 1024
    stage1_steps: int = 150
    stage2_steps: int = 1400
    # Stage 2 lists the train split's multi-turn VQA conversations this many times (1: once, as every other record).
    vqa_repeat: int = 1
    # MLLM batch per stage. Stage 2 at batch 8 x 1,400 steps costs what 16 x 700 did and read 2.7-3.8 points more
    # VQA in two same-stage-1 pairs (README "Where the default's MLLM minutes go").
    stage1_batch_size: int = 16
    stage2_batch_size: int = 8
    # The text-to-image stage (`mllm_t2i`, after stage 2; 0 steps: no such stage, the default budget): stage 2's
    # model trained on a mixture in which `t2i_share` of the examples are text-to-image prompts (the rest: stage 2's
    # conversations, so understanding is kept), with the semantic codes of output images no longer fed back
    # (`output_semantic_dropout: 1`). The generator binds the caption only after 30,000-60,000 such examples
    # (README "Text-to-image: the ladder"); stage 2 gives it about 14% of its examples.
    t2i_steps: int = 0
    t2i_batch_size: int = 32
    t2i_share: float = 0.75
    # Share of the text-to-image stage's text-to-image examples whose text is one of the train split's scene
    # captions (captions.json: every object named, most forms with its place) instead of a GenEval-style prompt,
    # which names only what its tag checks (0: prompts only). Same number of text-to-image examples either way.
    # Measured at the long budget (0.5): no category rose, and the generator still ignored the place words (README
    # "Captions that name every place"), so it stays 0.
    t2i_caption_share: float = 0.0
    # The semantic head's loss weight in the text-to-image stage (the model's `semantic_loss_weight`, set through
    # `model_overrides`; None keeps stage 2's, 1 in the tiny preset). With the semantic codes no longer fed back,
    # their loss (4.5-5 nats against the pixel head's 0.4-0.6) is most of the stage's gradient. Measured at the long
    # budget (0.1): the pixel losses ended where they did and T2I did not rise (README "Captions that name every
    # place"), so it stays unset.
    t2i_semantic_loss_weight: float | None = None
    eval_vqa: int = 400
    eval_captions: int = 100
    eval_chat: int = 150
    eval_t2i: int = 120
    probe_steps: int = 1500  # optimizer steps per code probe (tokenizer_eval, 2,000 train images)
    threads: int = 2
    # bf16 autocast in the teacher, tokenizer and MLLM training stages (weights and optimizer stay fp32). On a CPU
    # with native bf16 matmuls (AVX512-BF16 / AMX) the teacher and tokenizer ran 1.3-1.4x faster and the MLLM no
    # faster, and the teacher came out far weaker (README "bf16 autocast on the CPU"); elsewhere bf16 is emulated.
    bf16: bool = False
    # VQA on the validation split every `curve_every` stage-2 steps (0: off): accuracy against MLLM training
    # minutes (`eval.learning_curve`), in REPORT.md as a table and a plot.
    curve_every: int = 700
    curve_questions: int = 200
    # Validation text-to-image prompts drawn and scored at each curve point of the text-to-image stage (0: VQA only;
    # stage 2's points answer VQA only: 60 prompts cost about 30 s a point on 2 cores, VQA 3 s).
    curve_t2i_prompts: int = 0

    def __post_init__(self):
        minimums = dict.fromkeys(
            ("stage1_batch_size", "stage2_batch_size", "t2i_batch_size", "vqa_repeat"), 1
        )
        minimums |= dict.fromkeys(("t2i_steps", "curve_t2i_prompts"), 0)
        for name, minimum in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"DemoSettings.{name}: expected an integer >= {minimum}, got {value!r}")
        # Numbers: (name, accepts, what the error says is expected); None passes where "or none" is said.
        numbers = (
            ("t2i_share", lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("t2i_semantic_loss_weight", lambda v: v >= 0, "a number >= 0 or none"),
            ("t2i_caption_share", lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("teacher_dense_loss_weight", lambda v: v >= 0, "a number >= 0"),
        )
        for name, accepts, expected in numbers:
            value = getattr(self, name)
            if value is None and expected.endswith("or none"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not accepts(value):
                raise ValueError(f"DemoSettings.{name}: expected {expected}, got {value!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"DemoSettings.bf16: expected true or false, got {self.bf16!r}")


# Named budgets (`dualtoken demo --budget NAME`); explicit budget flags override them. "long" gives the MLLM's
# stage 2 about seven times the default's examples (10,000 steps x 8 against 1,400), with its VQA curve, a
# teacher trained with the per-patch class loss, whose codes carry shape (at the default budget they cost colour
# reading; at the long budget they pay, README "What more MLLM training buys"), and a text-to-image stage of
# 2,000 x 32 examples, three quarters of them text-to-image (README "A text-to-image stage").
BUDGETS: dict[str, dict] = {
    "default": {},
    "long": {
        "stage2_steps": 10000,
        "curve_every": 1000,
        "teacher_dense_loss_weight": 1.0,
        "t2i_steps": 2000,
        "curve_t2i_prompts": 60,
    },
}


@dataclass
class DemoContext:
    out: Path
    settings: DemoSettings
    summaries: dict[str, dict] = field(default_factory=dict)
    # False while a stage runs because --from forced it (it starts from scratch); True while it runs because it
    # has not finished (a training stage then continues from its newest checkpoint, if any).
    resume: bool = True

    @property
    def data_dir(self) -> Path:
        return self.out / "data"

    def path(self, name: str) -> Path:
        return self.out / name


@dataclass
class Stage:
    name: str
    description: str
    run: Callable[[DemoContext], dict]
    # A summary stage (the report) reads every earlier stage's outputs: it runs again whenever one of them ran.
    summary: bool = False


def _fresh(path: Path) -> Path:
    """A stage that reruns starts from an empty output directory."""
    if path.exists():
        shutil.rmtree(path)
    return path


def stage_data(ctx: DemoContext) -> dict:
    from data_recipes.shapes_dataset import write_shapes_dataset

    s = ctx.settings
    write_shapes_dataset(ctx.data_dir, n=s.scenes, size=s.image_size, seed=s.seed, force=True)
    manifest = json.loads((ctx.data_dir / "manifest.json").read_text())
    return {
        "dataset": str(ctx.data_dir),
        "splits": manifest["splits"],
        "heldout_pairs": manifest["heldout_pairs"],
    }


def stage_validate(ctx: DemoContext) -> dict:
    from data_recipes.validate import validate_dataset

    report = validate_dataset(ctx.data_dir)
    if not report.ok:
        raise RuntimeError(f"the generated dataset {ctx.data_dir} failed validation:\n{report.render()}")
    return {"records_checked": sum(report.records_checked.values()), "problems": 0}


def stage_teacher(ctx: DemoContext) -> dict:
    from tokenizer.teacher import TeacherSettings, train_teacher
    from tokenizer.teacher_checkpoint import work_dir
    from tokenizer.teacher_zero_shot import write_zero_shot, zero_shot_eval

    out = ctx.path("teacher")
    if not ctx.resume:
        _fresh(out)
        _fresh(work_dir(out))
    settings = TeacherSettings(
        steps=ctx.settings.teacher_steps,
        seed=ctx.settings.seed,
        threads=ctx.settings.threads,
        dense_loss_weight=ctx.settings.teacher_dense_loss_weight,
        bf16=ctx.settings.bf16,
    )
    metrics = train_teacher(ctx.data_dir, out, settings, resume=ctx.resume)
    result = zero_shot_eval(out, ctx.data_dir, split="test")
    write_zero_shot(out, result)
    return {
        "teacher": str(out),
        "train_seconds": metrics["train_seconds"],
        "zero_shot": _zero_shot_summary(result),
    }


def _zero_shot_summary(result: dict) -> dict:
    return {
        k: v for k, v in result.items() if not isinstance(v, (list, dict)) or k in ("all", "heldout", "seen")
    }


def _tokenizer_settings(ctx: DemoContext):
    """The tokenizer budget of the demo (the main run and every tokenizer ablation variant share it)."""
    from tokenizer.train import TokenizerTrainSettings

    overrides = {"steps": ctx.settings.tokenizer_steps} if ctx.settings.tokenizer_steps else {}
    if ctx.settings.bf16:
        overrides["mixed_precision"] = "bf16"
    return TokenizerTrainSettings(seed=ctx.settings.seed, threads=ctx.settings.threads, **overrides)


def stage_tokenizer(ctx: DemoContext) -> dict:
    from tokenizer.train import checkpoint_dirs, train_tokenizer

    out = ctx.path("tokenizer")
    resume = ctx.resume and bool(checkpoint_dirs(out))
    if not resume:
        _fresh(out)
    metrics = train_tokenizer(
        ctx.data_dir, out, _tokenizer_settings(ctx), teacher_dir=ctx.path("teacher"), resume=resume
    )
    return {"tokenizer": str(out), **{k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}}


def stage_tokenizer_eval(ctx: DemoContext) -> dict:
    from tokenizer.evaluate import evaluate_tokenizer
    from tokenizer.probe import probe_tokenizer

    out = _fresh(ctx.path("eval_tokenizer"))
    metrics = evaluate_tokenizer(
        ctx.path("tokenizer"), ctx.data_dir, ctx.path("teacher"), split="test", out_dir=out
    )
    # What the codes carry per scene cell and about position (the ceiling of what the MLLM can read from them).
    probe = probe_tokenizer(
        ctx.path("tokenizer"),
        ctx.data_dir,
        split="train",
        limit=2000,
        steps=ctx.settings.probe_steps,
        seed=ctx.settings.seed,
    )
    atomic_write_json(out / "probe.json", probe)
    return {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def stage_encode(ctx: DemoContext) -> dict:
    from tokenizer.encode import encode_dataset

    out = ctx.path("codes") / "train"
    _fresh(out)
    result = encode_dataset(ctx.path("tokenizer"), out, data_dir=ctx.data_dir, split="train")
    return {"codes": str(out), **{k: v for k, v in result.items() if isinstance(v, (int, float, str))}}


def stage_text_tokenizer(ctx: DemoContext) -> dict:
    from mllm.sequence import PROMPT_PIECES, SPECIAL_TOKENS
    from tokenizer.text_tokenizer import texts_from_dataset, train_text_tokenizer

    out = ctx.path("text_tokenizer")
    texts = texts_from_dataset(ctx.data_dir, split="train")
    tokenizer = train_text_tokenizer(
        texts,
        out,
        vocab_size=ctx.settings.text_vocab_size,
        special_tokens=(*SPECIAL_TOKENS, *PROMPT_PIECES),
        seed=ctx.settings.seed,
    )
    return {"text_tokenizer": str(out), "vocab": len(tokenizer), "texts": len(texts)}


def _train_mllm(
    ctx: DemoContext,
    config: str,
    output: Path,
    steps: int,
    batch_size: int,
    extra: list[str],
    callbacks: list | None = None,
    llava_files: list[Path] | None = None,
    prompt_files: list[Path] | None = None,
) -> dict:
    """Train one MLLM stage into `output`, continuing from its newest checkpoint when `ctx.resume` and it has one
    (conversations: `llava_files`, by default the train split's llava.json; text-to-image prompts: `prompt_files`,
    by default its prompts.jsonl)."""
    import torch

    from train.mllm_train import main as train_main
    from train.trainer import last_complete_checkpoint

    if ctx.resume and last_complete_checkpoint(output):
        extra = [*extra, "--resume"]
    else:
        _fresh(output)
    split = ctx.data_dir / "train"
    torch.set_num_threads(ctx.settings.threads)
    argv = [
        "--config", str(Path(__file__).resolve().parents[1] / "train" / "configs" / config),
        "--llava_files", *(str(f) for f in llava_files or [split / "llava.json"]),
        "--prompt_files", *(str(f) for f in prompt_files or [split / "prompts.jsonl"]),
        "--code_store", str(ctx.path("codes") / "train"),
        "--output_dir", str(output),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch_size),
        "--seed", str(ctx.settings.seed),
        *_bf16_args(ctx.settings.bf16, torch.cuda.is_available()),
        *extra,
    ]  # fmt: skip
    trainer = train_main(argv, callbacks=callbacks)
    atomic_write_json(output / "log_history.json", trainer.state.log_history)
    history = [row for row in trainer.state.log_history if "loss" in row or "train_loss" in row]
    throughput = (
        json.loads((output / "throughput.json").read_text()) if (output / "throughput.json").exists() else {}
    )
    return {
        "model": str(output),
        "steps": trainer.state.global_step,
        "log": history[-3:],
        "throughput": throughput,
    }


def _bf16_args(bf16: bool, cuda: bool) -> list[str]:
    """Trainer flags for `DemoSettings.bf16`: off leaves the trainer's own default (on with a bf16 GPU); on a machine
    without CUDA, bf16 autocast needs the trainer told to run on the CPU."""
    if not bf16:
        return []
    return ["--bf16", "true"] if cuda else ["--bf16", "true", "--use_cpu", "true"]


def _stage1_args(ctx: DemoContext, model_overrides: dict | None = None) -> list[str]:
    extra = [
        "--text_tokenizer",
        str(ctx.path("text_tokenizer")),
        "--image_tokenizer",
        str(ctx.path("tokenizer")),
    ]
    if model_overrides:
        extra += ["--model_overrides", json.dumps(model_overrides)]
    return extra


def _stage2_llava_files(ctx: DemoContext) -> list[Path]:
    """Stage 2's conversations: the train split's llava.json, then its VQA conversations (ids ending in "-vqa")
    `vqa_repeat - 1` more times, from a copy (re)written by each call to `mllm_data/vqa_conversations.json`."""
    everything = ctx.data_dir / "train" / "llava.json"
    if ctx.settings.vqa_repeat <= 1:
        return [everything]
    vqa = ctx.path("mllm_data") / "vqa_conversations.json"
    records = [
        r for r in json.loads(everything.read_text(encoding="utf-8")) if str(r.get("id", "")).endswith("-vqa")
    ]
    if not records:
        raise ValueError(
            f"vqa_repeat={ctx.settings.vqa_repeat}: {everything} holds no VQA conversations (-vqa ids)"
        )
    atomic_write_json(vqa, records)
    return [everything, *[vqa] * (ctx.settings.vqa_repeat - 1)]


def stage_mllm_stage1(ctx: DemoContext) -> dict:
    return _train_mllm(
        ctx,
        "tiny_stage1.yaml",
        ctx.path("mllm_stage1"),
        ctx.settings.stage1_steps,
        ctx.settings.stage1_batch_size,
        _stage1_args(ctx),
    )


def _stage_seconds(ctx: DemoContext, name: str) -> float:
    marker = ctx.out / "stages" / f"{name}.json"
    return float(json.loads(marker.read_text())["seconds"]) if marker.exists() else 0.0


def final_model_dir(run: Path, settings: DemoSettings) -> Path:
    """The model the chain ends with: the text-to-image stage's when the budget has one, else stage 2's."""
    return run / ("mllm_t2i" if settings.t2i_steps else "mllm")


def _curve(ctx: DemoContext, model_dir: Path, out: Path, minutes_before: float, t2i_prompts: int = 0) -> list:
    """The VQA (and, with `t2i_prompts`, T2I) curve callback of a stage that starts from `model_dir`, or none
    (`curve_every` 0)."""
    from eval.learning_curve import VQACurveCallback
    from mllm.processor import DualTokenProcessor

    s = ctx.settings
    if not s.curve_every:
        return []
    return [
        VQACurveCallback(
            DualTokenProcessor.from_pretrained(model_dir),
            ctx.data_dir / "val",
            out,
            every=s.curve_every,
            questions=s.curve_questions,
            minutes_before=minutes_before,
            seed=s.seed,
            t2i_prompts=t2i_prompts,
        )
    ]


def _curve_summary(callbacks: list) -> list[dict]:
    from eval.learning_curve import read_curve

    keys = ("step", "train_minutes", "overall", "t2i")
    return [{k: p[k] for k in keys if k in p} for c in callbacks for p in read_curve(c.path)]


def stage_mllm_stage2(ctx: DemoContext) -> dict:
    s, stage1 = ctx.settings, ctx.path("mllm_stage1")
    extra = ["--model_name_or_path", str(stage1)]
    callbacks = _curve(ctx, stage1, ctx.path("mllm") / "vqa_curve", _stage_seconds(ctx, "mllm_stage1") / 60)
    summary = _train_mllm(
        ctx,
        "tiny_stage2.yaml",
        ctx.path("mllm"),
        s.stage2_steps,
        s.stage2_batch_size,
        extra,
        callbacks,
        _stage2_llava_files(ctx),
    )
    if callbacks:
        summary["vqa_curve"] = _curve_summary(callbacks)
    return summary


def t2i_mixture(conversations: int, prompts: int, share: float) -> dict[str, float]:
    """`conversation_repeat` / `prompt_repeat` that make `share` of the examples text-to-image prompts."""
    if prompts < 1:
        raise ValueError("the text-to-image stage needs text-to-image prompts; the prompts file holds none")
    if share >= 1 or conversations < 1:
        return {"conversation_repeat": 0.0, "prompt_repeat": 1.0}
    return {"conversation_repeat": 1.0, "prompt_repeat": share / (1 - share) * conversations / prompts}


def caption_prompts(captions_json: Path, count: int, seed: int) -> list[dict]:
    """`count` (caption, image) pairs drawn without replacement from a COCO captions file, as prompt records (the
    image named by its file, as the code store keys it)."""
    import random

    data = json.loads(captions_json.read_text())
    files = {image["id"]: image["file_name"] for image in data["images"]}
    annotations = data["annotations"]
    if count > len(annotations):
        raise ValueError(f"{captions_json}: {count} captions wanted, it holds {len(annotations)}")
    records = []
    for i in sorted(random.Random(seed).sample(range(len(annotations)), count)):
        image_id = annotations[i]["image_id"]
        if image_id not in files:
            raise ValueError(f"{captions_json}: annotations[{i}].image_id {image_id!r} is not in its images")
        records.append({"caption": annotations[i]["caption"], "image_id": image_id, "file": files[image_id]})
    return records


def stage_mllm_t2i(ctx: DemoContext) -> dict:
    from eval.learning_curve import CURVE_FILE, read_curve
    from train.data import load_llava, load_prompts

    s, stage2 = ctx.settings, ctx.path("mllm")
    if not s.t2i_steps:
        _fresh(ctx.path("mllm_t2i"))
        return {"skipped": "t2i_steps is 0: this budget has no text-to-image stage; stage 2's model is final"}
    split = ctx.data_dir / "train"
    prompt_files = [split / "prompts.jsonl"]
    prompts = len(load_prompts(prompt_files[0]))
    if s.t2i_caption_share:
        # Captions beside the prompts, as many as make `t2i_caption_share` of the list; the mixture below keeps
        # the number of text-to-image examples what the prompts alone would get.
        count = round(prompts * s.t2i_caption_share / (1 - s.t2i_caption_share))
        prompt_files.append(ctx.out / "mllm_t2i_captions.jsonl")
        records = caption_prompts(split / "captions.json", count, s.seed)
        atomic_write_text(prompt_files[-1], "".join(json.dumps(r) + "\n" for r in records))
        prompts += count
    mixture = t2i_mixture(len(load_llava(split / "llava.json")), prompts, s.t2i_share)
    overrides = {"output_semantic_dropout": 1.0}
    if s.t2i_semantic_loss_weight is not None:
        overrides["semantic_loss_weight"] = s.t2i_semantic_loss_weight
    extra = [
        "--model_name_or_path", str(stage2),
        "--model_overrides", json.dumps(overrides),
        *(f"--{name}={value:.6f}" for name, value in mixture.items()),
    ]  # fmt: skip
    stage2_curve = read_curve(stage2 / "vqa_curve" / CURVE_FILE)
    minutes_before = (
        stage2_curve[-1]["train_minutes"]
        if stage2_curve
        else (_stage_seconds(ctx, "mllm_stage1") + _stage_seconds(ctx, "mllm_stage2")) / 60
    )
    out = ctx.path("mllm_t2i")
    callbacks = _curve(ctx, stage2, out / "vqa_curve", minutes_before, s.curve_t2i_prompts)
    summary = _train_mllm(
        ctx, "tiny_t2i.yaml", out, s.t2i_steps, s.t2i_batch_size, extra, callbacks, prompt_files=prompt_files
    )
    summary["mixture"] = mixture | {"prompt_files": [str(f) for f in prompt_files], "prompts": prompts}
    if callbacks:
        summary["vqa_curve"] = _curve_summary(callbacks)
    return summary


def _evaluate_vqa(ctx: DemoContext, model, processor, out: Path) -> dict:
    from eval.tasks import EvalSettings, heldout_image_ids, run_vqa, scene_objects

    s, test = ctx.settings, ctx.data_dir / "test"
    return run_vqa(
        model, processor, test / "vqa_questions.json", test / "vqa_annotations.json", test / "images", out,
        EvalSettings(batch_size=32, limit=s.eval_vqa, max_new_tokens=8, seed=s.seed),
        heldout_images=heldout_image_ids(test / "scenes.jsonl"), shuffled_images=True,
        objects=scene_objects(test / "scenes.jsonl"),
    )  # fmt: skip


def _evaluate_t2i(ctx: DemoContext, model, processor, out: Path) -> dict:
    from eval.t2i_tasks import run_t2i
    from eval.tasks import EvalSettings

    s = ctx.settings
    return run_t2i(
        model,
        processor,
        ctx.data_dir / "test" / "prompts.jsonl",
        out,
        EvalSettings(batch_size=16, limit=s.eval_t2i, seed=s.seed),
        real_images=ctx.data_dir / "test" / "images",
        teacher_dir=ctx.path("teacher"),
        reference=True,
    )


def stage_evaluate(ctx: DemoContext) -> dict:
    import torch

    from eval.tasks import EvalSettings, run_captions, run_chat
    from mllm.checkpoint import load_checkpoint

    torch.set_num_threads(ctx.settings.threads)
    s = ctx.settings
    out = _fresh(ctx.path("eval"))
    final = final_model_dir(ctx.out, s)
    model, processor = load_checkpoint(final)
    test = ctx.data_dir / "test"
    vqa = _evaluate_vqa(ctx, model, processor, out)
    captions = run_captions(
        model, processor, test / "captions.json", test / "images", out,
        EvalSettings(batch_size=32, limit=s.eval_captions, max_new_tokens=48, seed=s.seed),
    )  # fmt: skip
    chat = run_chat(
        model, processor, test / "llava.json", test, out,
        EvalSettings(batch_size=32, limit=s.eval_chat, max_new_tokens=32, seed=s.seed),
    )  # fmt: skip
    t2i = _evaluate_t2i(ctx, model, processor, out)
    return {"model": str(final), "vqa": vqa, "captions": captions, "chat": chat, "t2i": t2i}


# ------------------------------------------------------------------ ablations (`dualtoken demo --ablations`)
def _mllm_ablation(ctx: DemoContext, name: str, model_overrides: dict, evaluate: Callable) -> dict:
    """Both MLLM stages again with `model_overrides`, the same budget and data as the main run, then `evaluate`
    (`_evaluate_vqa` or `_evaluate_t2i`) into `ablations/<name>/eval`."""
    import torch

    from mllm.checkpoint import load_checkpoint

    root = ctx.path("ablations") / name
    s = ctx.settings
    _train_mllm(
        ctx,
        "tiny_stage1.yaml",
        root / "stage1",
        s.stage1_steps,
        s.stage1_batch_size,
        _stage1_args(ctx, model_overrides),
    )
    _train_mllm(
        ctx,
        "tiny_stage2.yaml",
        root / "mllm",
        s.stage2_steps,
        s.stage2_batch_size,
        ["--model_name_or_path", str(root / "stage1")],
        llava_files=_stage2_llava_files(ctx),
    )
    shutil.rmtree(root / "stage1")  # only the final model is evaluated; stage 1 weights are not needed again
    torch.set_num_threads(s.threads)
    model, processor = load_checkpoint(root / "mllm")
    metrics = evaluate(ctx, model, processor, _fresh(root / "eval"))
    return {"overrides": model_overrides, "model": str(root / "mllm"), "metrics": metrics}


def stage_ablate_understanding(ctx: DemoContext) -> dict:
    return _mllm_ablation(
        ctx, "semantic_pixel_tokens", {"understanding_tokens": "semantic+pixel"}, _evaluate_vqa
    )


def stage_ablate_pixel_head(ctx: DemoContext) -> dict:
    return _mllm_ablation(ctx, "pixel_head_only", {"use_semantic_head": False}, _evaluate_t2i)


def stage_ablate_tokenizer(ctx: DemoContext) -> dict:
    from tokenizer.ablate import run_ablations

    result = run_ablations(
        ctx.data_dir,
        ctx.path("teacher"),
        ctx.path("ablations") / "tokenizer",
        _tokenizer_settings(ctx),
        existing={"dualtoken": ctx.path("tokenizer")},
    )
    return {
        "table": str(ctx.path("ablations") / "tokenizer" / "ablation.md"),
        "variants": list(result["variants"]),
    }


def stage_report(ctx: DemoContext) -> dict:
    from eval.report import write_report

    path = write_report(ctx.out, ctx.summaries)
    return {"report": str(path)}


STAGES: list[Stage] = [
    Stage("data", "render the shapes world (train/val/test, held-out color-shape pairs)", stage_data),
    Stage("validate", "validate every file of the dataset", stage_validate),
    Stage(
        "teacher",
        "train the tiny SigLIP teacher (sigmoid loss on captions; the long budget adds a per-patch class loss) and "
        "score it zero-shot",
        stage_teacher,
    ),
    Stage(
        "tokenizer",
        "train DualToken (pixel + semantic residual VQ) distilled from the teacher",
        stage_tokenizer,
    ),
    Stage(
        "tokenizer_eval",
        "PSNR, SSIM, FD, zero-shot and codebook usage on the test split; probes of what the codes carry",
        stage_tokenizer_eval,
    ),
    Stage("encode", "pre-tokenize the train split into pixel + semantic code shards", stage_encode),
    Stage("text_tokenizer", "train the SentencePiece text tokenizer on the train text", stage_text_tokenizer),
    Stage(
        "mllm_stage1", "instruction tuning stage 1: projectors + depth heads, LLM frozen", stage_mllm_stage1
    ),
    Stage("mllm_stage2", "instruction tuning stage 2: everything trains", stage_mllm_stage2),
    Stage(
        "mllm_t2i",
        "text-to-image stage (long budget): mostly text-to-image examples, semantic codes not fed back",
        stage_mllm_t2i,
    ),
    Stage("evaluate", "VQA, captions, chat and text-to-image on the test split", stage_evaluate),
    Stage(
        "report", "write REPORT.md with tables, image grids and training curves", stage_report, summary=True
    ),
]

# Run after the main stages with `--ablations` (each costs about one tokenizer or one MLLM training budget);
# the report stage runs again afterwards so REPORT.md gains their tables.
ABLATION_STAGES: list[Stage] = [
    Stage(
        "ablate_understanding",
        "MLLM again with semantic+pixel understanding tokens (same budget); VQA",
        stage_ablate_understanding,
    ),
    Stage(
        "ablate_pixel_head",
        "MLLM again with the pixel head only (no semantic head; same budget); text-to-image",
        stage_ablate_pixel_head,
    ),
    Stage(
        "ablate_tokenizer",
        "tokenizer ablation: same-layer, recon-only, semantic-only (same budget as DualToken)",
        stage_ablate_tokenizer,
    ),
    Stage("report_ablations", "rewrite REPORT.md with the ablation tables", stage_report, summary=True),
]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): the demo's cost independent of how
    busy the machine was."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_demo(
    out: Path, settings: DemoSettings, rerun_from: str | None = None, ablations: bool = False
) -> dict[str, dict]:
    stages = STAGES + ABLATION_STAGES if ablations else STAGES
    names = [stage.name for stage in stages]
    if rerun_from is not None and rerun_from not in names:
        raise ValueError(f"--from: unknown stage {rerun_from!r}; stages are {', '.join(names)}")
    ctx = DemoContext(out=out, settings=settings)
    forced = names[names.index(rerun_from) :] if rerun_from else []
    start = time.perf_counter()
    ran_any = False
    for i, stage in enumerate(stages, 1):
        marker = out / "stages" / f"{stage.name}.json"
        header = f"[{i}/{len(stages)}] {stage.name}: {stage.description}"
        if marker.exists() and stage.name not in forced and not (stage.summary and ran_any):
            ctx.summaries[stage.name] = json.loads(marker.read_text())["summary"]
            print(f"{header} -- already done, reusing {marker}", flush=True)
            continue
        print(header, flush=True)
        ran_any = True
        ctx.resume = stage.name not in forced
        t0, cpu0 = time.perf_counter(), _cpu_seconds()
        summary = stage.run(ctx)
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        ctx.summaries[stage.name] = summary
        atomic_write_json(
            marker, {"summary": summary, "seconds": elapsed, "cpu_seconds": cpu, "settings": asdict(settings)}
        )
        line = json.dumps(summary, default=str)
        print(
            f"    done in {elapsed:.1f} s ({cpu:.0f} CPU s): {line if len(line) <= 400 else line[:397] + '...'}",
            flush=True,
        )
    print(f"demo finished in {time.perf_counter() - start:.1f} s; outputs under {out}", flush=True)
    return ctx.summaries
