"""`dualtoken demo` (the end-to-end run on the embedded default) and `dualtoken eval ...` subcommands."""

from __future__ import annotations

from pathlib import Path

from eval.demo import STAGES, DemoSettings, run_demo


def _demo(args) -> int:
    settings = DemoSettings(scenes=args.scenes, image_size=args.size, seed=args.seed)
    run_demo(Path(args.out), settings, rerun_from=args.rerun_from)
    return 0


def register(subparsers) -> None:
    demo = subparsers.add_parser("demo", help="run the whole chain on the shapes world and write a report")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--scenes", type=int, default=DemoSettings.scenes, help="shapes-world scenes to render")
    demo.add_argument("--size", type=int, default=DemoSettings.image_size, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=DemoSettings.seed)
    demo.add_argument(
        "--from",
        dest="rerun_from",
        choices=[stage.name for stage in STAGES],
        help="run this stage and all later ones again even if they finished before",
    )
    demo.set_defaults(func=_demo)
