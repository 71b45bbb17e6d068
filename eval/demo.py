"""The end-to-end demo on the embedded default: every stage of the chain, each reused when already finished.

`dualtoken demo --out runs/demo` runs the stages in order. A stage writes its outputs under the run directory and,
last, a marker `stages/<name>.json` with its summary; a re-run skips every stage whose marker exists, so an
interrupted demo continues where it stopped. `--from STAGE` forces that stage and all later ones to run again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class DemoSettings:
    """Budget of the demo; the defaults are what `make demo` runs on 2 CPU cores."""

    scenes: int = 12000
    image_size: int = 64
    seed: int = 0


@dataclass
class DemoContext:
    out: Path
    settings: DemoSettings
    summaries: dict[str, dict] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.out / "data"


@dataclass
class Stage:
    name: str
    description: str
    run: Callable[[DemoContext], dict]


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path)


def stage_data(ctx: DemoContext) -> dict:
    from data_recipes.shapes_dataset import write_shapes_dataset

    s = ctx.settings
    write_shapes_dataset(ctx.data_dir, n=s.scenes, size=s.image_size, seed=s.seed, force=True)
    manifest = json.loads((ctx.data_dir / "manifest.json").read_text())
    return {"dataset": str(ctx.data_dir), "splits": manifest["splits"], "heldout_pairs": manifest["heldout_pairs"]}


def stage_validate(ctx: DemoContext) -> dict:
    from data_recipes.validate import validate_dataset

    report = validate_dataset(ctx.data_dir)
    if not report.ok:
        raise RuntimeError(f"the generated dataset {ctx.data_dir} failed validation:\n{report.render()}")
    return {"records_checked": report.records_checked, "problems": 0}


STAGES: list[Stage] = [
    Stage("data", "render the shapes world (train/val/test, held-out color-shape pairs)", stage_data),
    Stage("validate", "validate every file of the dataset", stage_validate),
]


def run_demo(out: Path, settings: DemoSettings, rerun_from: str | None = None) -> dict[str, dict]:
    names = [stage.name for stage in STAGES]
    if rerun_from is not None and rerun_from not in names:
        raise ValueError(f"--from: unknown stage {rerun_from!r}; stages are {', '.join(names)}")
    ctx = DemoContext(out=out, settings=settings)
    forced = names[names.index(rerun_from) :] if rerun_from else []
    start = time.perf_counter()
    for i, stage in enumerate(STAGES, 1):
        marker = out / "stages" / f"{stage.name}.json"
        header = f"[{i}/{len(STAGES)}] {stage.name}: {stage.description}"
        if marker.exists() and stage.name not in forced:
            ctx.summaries[stage.name] = json.loads(marker.read_text())["summary"]
            print(f"{header} -- already done, reusing {marker}", flush=True)
            continue
        print(header, flush=True)
        t0 = time.perf_counter()
        summary = stage.run(ctx)
        elapsed = time.perf_counter() - t0
        ctx.summaries[stage.name] = summary
        _write_json_atomic(marker, {"summary": summary, "seconds": elapsed, "settings": asdict(settings)})
        print(f"    done in {elapsed:.1f} s: {json.dumps(summary)}", flush=True)
    print(f"demo finished in {time.perf_counter() - start:.1f} s; outputs under {out}", flush=True)
    return ctx.summaries
