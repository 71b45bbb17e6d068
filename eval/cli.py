"""`dualtoken demo` (the end-to-end run on the embedded default) and `dualtoken eval ...` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eval.demo import ABLATION_STAGES, BUDGETS, STAGES, DemoSettings, run_demo


def _demo(args) -> int:
    budget = dict(BUDGETS[args.budget])
    if args.batch_size is not None:  # every MLLM stage; a stage's own flag below overrides it
        budget |= dict.fromkeys(("stage1_batch_size", "stage2_batch_size", "t2i_batch_size"), args.batch_size)
    budget |= {
        name: getattr(args, name)
        for name in (
            "teacher_steps",
            "teacher_dense_loss_weight",
            "tokenizer_steps",
            "stage1_steps",
            "stage2_steps",
            "vqa_repeat",
            "stage1_batch_size",
            "stage2_batch_size",
            "t2i_steps",
            "t2i_batch_size",
            "t2i_share",
            "t2i_caption_share",
            "t2i_semantic_loss_weight",
            "probe_steps",
            "threads",
            "curve_every",
            "curve_t2i_prompts",
            "bf16",
        )
        if getattr(args, name) is not None
    }
    if args.eval_limit is not None:
        budget.update({f"eval_{task}": args.eval_limit for task in ("vqa", "captions", "chat", "t2i")})
        budget["curve_questions"] = args.eval_limit
        if budget.get("curve_t2i_prompts"):
            budget["curve_t2i_prompts"] = min(budget["curve_t2i_prompts"], args.eval_limit)
    try:
        settings = DemoSettings(scenes=args.scenes, image_size=args.size, seed=args.seed, **budget)
    except ValueError as error:
        print(f"dualtoken demo: error: {error}", file=sys.stderr)
        return 2
    run_demo(Path(args.out), settings, rerun_from=args.rerun_from, ablations=args.ablations)
    return 0


def _load(args):
    from mllm.checkpoint import load_checkpoint

    return load_checkpoint(args.model, device=args.device)


def _settings(args):
    from eval.tasks import EvalSettings

    return EvalSettings(
        batch_size=args.batch_size, limit=args.limit, max_new_tokens=args.max_new_tokens, seed=args.seed
    )


def _print_metrics(metrics: dict) -> int:
    print(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    return 0


def _eval_vqa(args) -> int:
    from eval.tasks import heldout_image_ids, run_vqa, scene_objects

    heldout = heldout_image_ids(args.scenes) if args.scenes else None
    objects = scene_objects(args.scenes) if args.scenes else None
    model, processor = _load(args)
    return _print_metrics(
        run_vqa(
            model,
            processor,
            args.questions,
            args.annotations,
            args.image_root,
            args.out,
            _settings(args),
            image_pattern=args.image_pattern,
            heldout_images=heldout,
            shuffled_images=args.shuffled_images,
            objects=objects,
        )
    )


def _eval_caption(args) -> int:
    from eval.tasks import run_captions

    model, processor = _load(args)
    return _print_metrics(
        run_captions(
            model,
            processor,
            args.captions,
            args.image_root,
            args.out,
            _settings(args),
            image_pattern=args.image_pattern,
        )
    )


def _eval_chat(args) -> int:
    from eval.tasks import run_chat

    model, processor = _load(args)
    return _print_metrics(
        run_chat(model, processor, args.conversations, args.image_root, args.out, _settings(args))
    )


def _eval_t2i(args) -> int:
    from eval.t2i_tasks import run_t2i
    from mllm.generation import GenerationSettings

    sampling = {
        "cfg_scale": args.cfg,
        "cfg_plausibility": args.cfg_plausibility,
        "image_temperature": args.image_temperature,
        "image_top_k": args.image_top_k,
        "image_top_p": args.image_top_p,
    }
    overrides = {k: v for k, v in sampling.items() if v is not None} or None
    try:  # the settings' own checks, before the model is loaded
        GenerationSettings(**(overrides or {}))
    except ValueError as error:
        print(f"dualtoken eval t2i: error: {error}", file=sys.stderr)
        return 2
    model, processor = _load(args)
    return _print_metrics(
        run_t2i(
            model,
            processor,
            args.prompts,
            args.out,
            _settings(args),
            args.n,
            generation_overrides=overrides,
            real_images=args.real_images,
            teacher_dir=args.teacher,
            reference=args.reference,
        )
    )


def _common(parser, batch_size: int = 16) -> None:
    parser.add_argument("--model", required=True, help="a saved DualTokenMLLM directory")
    parser.add_argument("--out", required=True, help="output directory (per-sample JSONL + metrics JSON)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate N samples: a seeded random subset, kept in file order",
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")


def register_eval(subparsers) -> None:
    from eval.tasks import SHAPES_IMAGE_PATTERN

    group = subparsers.add_parser("eval", help="evaluate a model: vqa, caption, chat, t2i, tokenizer")
    sub = group.add_subparsers(dest="eval_command", metavar="TASK", required=True)
    pattern_help = f"image file name from its id (default {SHAPES_IMAGE_PATTERN}; COCO: COCO_val2014_{{image_id:012d}}.jpg)"

    vqa = sub.add_parser("vqa", help="VQAv2 accuracy (official normalization and 10-annotator soft score)")
    _common(vqa)
    vqa.add_argument("--questions", required=True, help="VQAv2 questions JSON")
    vqa.add_argument("--annotations", required=True, help="VQAv2 annotations JSON")
    vqa.add_argument("--image-root", required=True)
    vqa.add_argument("--image-pattern", default=SHAPES_IMAGE_PATTERN, help=pattern_help)
    vqa.add_argument(
        "--scenes",
        help="shapes-world scenes.jsonl: report held-out combinations separately and split wrong color, shape and "
        "position answers into another object's and absent ones",
    )
    vqa.add_argument(
        "--shuffled-images",
        action="store_true",
        help="also answer every question with another image of the set (a control: what the question alone gives)",
    )
    vqa.set_defaults(func=_eval_vqa)

    caption = sub.add_parser("caption", help="CIDEr-D and BLEU-4 on a COCO-captions file (pure Python)")
    _common(caption)
    caption.add_argument("--captions", required=True, help="COCO captions JSON")
    caption.add_argument("--image-root", required=True)
    caption.add_argument("--image-pattern", default=SHAPES_IMAGE_PATTERN, help=pattern_help)
    caption.set_defaults(func=_eval_caption)

    chat = sub.add_parser("chat", help="multi-turn answer accuracy per turn on LLaVA conversations")
    _common(chat)
    chat.add_argument("--conversations", required=True, help="LLaVA JSON (records whose id ends with -chat)")
    chat.add_argument(
        "--image-root", required=True, help="directory the conversations' image paths are relative to"
    )
    chat.set_defaults(func=_eval_chat)

    t2i = sub.add_parser(
        "t2i", help="text-to-image accuracy per GenEval-style category (shapes-world parser)"
    )
    _common(t2i, batch_size=8)
    t2i.add_argument("--prompts", required=True, help="prompts JSONL (prompt_id, prompt, tag, heldout, spec)")
    t2i.add_argument("--n", type=int, default=1, help="images per prompt")
    t2i.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (default 3.0)")
    t2i.add_argument(
        "--cfg-plausibility",
        type=float,
        default=None,
        help="with CFG, sample only codes whose conditional probability is at least this share of the best one "
        "(default 0.01 for small codebooks, 0 for paper-sized ones)",
    )
    t2i.add_argument(
        "--image-temperature",
        type=float,
        default=None,
        help="image code temperature; <= 0 is greedy (default 1)",
    )
    t2i.add_argument(
        "--image-top-k",
        type=int,
        default=None,
        help="image codes: keep the k best (default 64 small / 900 paper)",
    )
    t2i.add_argument(
        "--image-top-p", type=float, default=None, help="image codes: nucleus share (default 0.96)"
    )
    t2i.add_argument(
        "--real-images",
        help="folder of real PNGs: adds the FD of generated vs real images on teacher SigLIP features",
    )
    t2i.add_argument(
        "--teacher", help="teacher SigLIP directory for the FD (default: the tokenizer's teacher)"
    )
    t2i.add_argument(
        "--reference",
        action="store_true",
        help="also score each prompt's own image ('file' in its spec) and its reconstruction through the "
        "image tokenizer: the ceiling of the metric for this tokenizer",
    )
    t2i.set_defaults(func=_eval_t2i)

    from tokenizer.evaluate import register as register_tokenizer_eval

    register_tokenizer_eval(sub, name="tokenizer")


def register(subparsers) -> None:
    register_eval(subparsers)
    demo = subparsers.add_parser("demo", help="run the whole chain on the shapes world and write a report")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--scenes", type=int, default=DemoSettings.scenes, help="shapes-world scenes to render")
    demo.add_argument("--size", type=int, default=DemoSettings.image_size, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=DemoSettings.seed)
    budget = demo.add_argument_group("budget (defaults: what `make demo` runs in 21-25 minutes on 2 cores)")
    budget.add_argument(
        "--budget",
        choices=sorted(BUDGETS),
        default="default",
        help="named budget: default (what `make demo` runs) or long (stage 2 sees seven times the examples, a teacher with "
        "the per-patch class loss, a text-to-image stage of 2,000 x 32 examples, with VQA and T2I against minutes; "
        "about 105 minutes in all on 2 cores); the flags below override it",
    )
    budget.add_argument("--teacher-steps", type=int)
    budget.add_argument(
        "--teacher-dense-loss-weight",
        type=float,
        help="weight of the teacher's per-patch class loss (0: sigmoid loss only; default "
        f"{DemoSettings.teacher_dense_loss_weight:g}, the long budget 1)",
    )
    budget.add_argument("--tokenizer-steps", type=int)
    budget.add_argument("--stage1-steps", type=int, help="MLLM stage 1 (projectors + heads) steps")
    budget.add_argument("--stage2-steps", type=int, help="MLLM stage 2 (everything) steps")
    budget.add_argument(
        "--vqa-repeat",
        type=int,
        help=f"stage 2 lists the multi-turn VQA conversations this many times (default {DemoSettings.vqa_repeat})",
    )
    budget.add_argument(
        "--batch-size", type=int, help="MLLM batch of every stage (the stage flags below override it)"
    )
    budget.add_argument(
        "--stage1-batch-size", type=int, help=f"MLLM stage 1 batch (default {DemoSettings.stage1_batch_size})"
    )
    budget.add_argument(
        "--stage2-batch-size",
        type=int,
        help=f"MLLM stage 2 batch (default {DemoSettings.stage2_batch_size})",
    )
    budget.add_argument(
        "--t2i-steps",
        type=int,
        help="steps of the text-to-image stage after stage 2 (0: none, the default budget; the long budget 2,000)",
    )
    budget.add_argument(
        "--t2i-batch-size",
        type=int,
        help=f"text-to-image stage batch (default {DemoSettings.t2i_batch_size})",
    )
    budget.add_argument(
        "--t2i-share",
        type=float,
        help="share of text-to-image prompts among the text-to-image stage's examples, the rest stage 2's "
        f"conversations (default {DemoSettings.t2i_share:g})",
    )
    budget.add_argument(
        "--t2i-caption-share",
        type=float,
        help="share of the text-to-image stage's text-to-image examples written as the train split's scene "
        "captions (every object named) instead of GenEval-style prompts, same number of examples "
        f"(default {DemoSettings.t2i_caption_share:g})",
    )
    budget.add_argument(
        "--t2i-semantic-loss-weight",
        type=float,
        help="the semantic head's loss weight in the text-to-image stage "
        "(default: stage 2's model's own, 1 in the tiny preset)",
    )
    budget.add_argument("--probe-steps", type=int, help="optimizer steps per code probe in tokenizer_eval")
    budget.add_argument(
        "--eval-limit", type=int, help="samples per evaluation task (and questions per VQA curve point)"
    )
    budget.add_argument("--threads", type=int, help="torch threads")
    budget.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 autocast in the teacher, tokenizer and MLLM training stages (faster on CPUs with native bf16 "
        "matmuls, slower elsewhere; default off)",
    )
    budget.add_argument(
        "--curve-every",
        type=int,
        help=f"stage-2 steps between VQA points on the validation split (0: none; default "
        f"{DemoSettings.curve_every})",
    )
    budget.add_argument(
        "--curve-t2i-prompts",
        type=int,
        help="validation text-to-image prompts drawn and scored at each curve point of the text-to-image stage "
        "(0: none; the long budget 60)",
    )
    demo.add_argument(
        "--from",
        dest="rerun_from",
        choices=[stage.name for stage in STAGES + ABLATION_STAGES],
        help="run this stage and all later ones again even if they finished before",
    )
    demo.add_argument(
        "--ablations",
        action="store_true",
        help="after the main chain, also run the ablations with the same budget (semantic+pixel understanding "
        "tokens, pixel head only, the tokenizer ablation; about two MLLM and three tokenizer budgets more) and "
        "add their tables to REPORT.md",
    )
    demo.set_defaults(func=_demo)
