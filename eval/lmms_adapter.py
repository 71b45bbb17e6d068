"""lmms-eval model adapter: `python -m lmms_eval --model dualtoken` evaluates a DualToken-MLLM checkpoint.

`DualTokenLMMS` subclasses lmms-eval's model base (`lmms_eval.api.model.lmms`) and loads a checkpoint directory
with `mllm.checkpoint.load_checkpoint`. lmms-eval finds it through the `lmms_eval.models` entry-point group
(pyproject.toml: `dualtoken = "eval.lmms_adapter:manifest"`), so nothing has to be copied into lmms-eval.

Install. lmms-eval 0.7.3 declares torchvision as a hard dependency, and the only torchvision build on this
project's machines is a CUDA one that breaks the CPU torch import; nothing on the path `python -m lmms_eval` takes
with this adapter imports it. So lmms-eval goes in without its declared dependencies, the `lmms` extra brings the
ones that path imports, and pytablewriter (the results table) goes in without its own, whose typepy[datetime]
would downgrade python-dateutil::

    .venv/bin/pip install --no-build-isolation -e ".[lmms]"
    .venv/bin/pip install --no-deps lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 \
        mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1

The `lmms` extra pins filelock 3.32.7: lmms-eval 0.7.3's `simple_evaluate` starts with `import filelock._api`,
which filelock 4 removed (with filelock 4 the CLI logs "No module named 'filelock._api'", writes no results and
still exits 0); 3.32.7 satisfies every other package here.

Run on the shapes world (everything local, nothing downloaded)::

    dualtoken data shapes --out data/shapes --n 200 --size 64
    python -m eval.lmms_tasks.shapes_vqa.prepare --split data/shapes/test --out runs/lmms_tasks
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model dualtoken \\
        --model_args pretrained=CHECKPOINT_DIR,dtype=float32 --tasks shapes_vqa \\
        --include_path runs/lmms_tasks --batch_size 8 --output_path runs/lmms_eval --log_samples

Standard benchmarks run the same way (`--tasks vqav2_val,textvqa_val,...`) once their datasets are reachable.

Model arguments (`--model_args k=v,...`): `pretrained` (the checkpoint directory, required), `device` (default:
`--device`, else cuda:LOCAL_RANK under a multi-process launch, else CUDA when present, else CPU), `dtype`
(float32 | bfloat16 | float16), `batch_size` (or `--batch_size`), `max_new_tokens` (used when a task's
generation kwargs give none), `seed` (request i of a call samples from stream seed + i, whatever the batch size), and
`system_prompt` (text, or a file holding it).

Requests:

- `generate_until`: batched (consecutive requests with equal generation kwargs). A request's context becomes one user message; the images `doc_to_visual` returns
  (PIL) are matched in order to `<image>` placeholders in the context, and when the context has none, one
  `<image>` line per image goes in front of it (the layout the model is trained on). `mllm.generation.generate_chat`
  formats the prompt with the processor's chat template and decodes. Generation kwargs: `until` (stop strings,
  cut from the reply), `max_new_tokens`, `temperature`, `do_sample` (False means greedy whatever the
  temperature; True with temperature 0 samples at 1.0), `top_p`, `top_k`; `num_beams` > 1 is refused; other keys
  are ignored with a warning.
- `generate_until_multi_round`: the lmms-eval protocol. Round 0 answers the request's context; after round k the
  task's `doc_to_text(doc, previous_output=..., round_idx=k + 1, previous_round_info=...)` returns the next
  round's (visuals, context, terminal, round results, info) and each round is a fresh single-turn prompt (the
  task carries any history in its text). Rows of a batch stop independently; the reply is the list of rounds.
- `loglikelihood` (and so `multiple_choice` tasks) raises NotImplementedError.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from eval.tasks import contiguous_batches
from mllm.sequence import IMAGE_PLACEHOLDER

NO_DEPS_PACKAGES = (
    "lmms-eval==0.7.3 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 "
    "tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1"
)
INSTALL_HINT = (
    "install lmms-eval without its declared dependencies (it requires torchvision, which this project does not "
    f'install): `.venv/bin/pip install --no-build-isolation -e ".[lmms]"` then `.venv/bin/pip install --no-deps '
    f"{NO_DEPS_PACKAGES}`"
)

try:
    from lmms_eval.api.instance import Instance
    from lmms_eval.api.model import lmms
except ImportError as err:  # pragma: no cover - exercised only where lmms-eval is absent
    raise ImportError(f"eval.lmms_adapter needs lmms-eval ({err}); {INSTALL_HINT}") from err

MODEL_ID = "dualtoken"
CLASS_PATH = "eval.lmms_adapter.DualTokenLMMS"
SUPPORTED = "generate_until and generate_until_multi_round"
HANDLED_GEN_KWARGS = frozenset(
    {"until", "max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams"}
)

logger = logging.getLogger(__name__)


def manifest():
    """The `lmms_eval.models` entry point: registers `--model dualtoken` (a simple, non-chat model)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"dualtoken model arg {name}: expected an integer >= {minimum}, got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"dualtoken model arg {name}: expected an integer >= {minimum}, got {value!r}"
        ) from None
    if number != float(value) or number < minimum:
        raise ValueError(f"dualtoken model arg {name}: expected an integer >= {minimum}, got {value!r}")
    return number


def _stop_strings(until: Any) -> tuple[str, ...]:
    if until is None:
        return ()
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs 'until': expected a string or a list of strings, got {until!r}")
    return tuple(s for s in until if s)


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int, seed: int):
    """lmms-eval generation kwargs -> `mllm.generation.GenerationSettings` (text only, no image output)."""
    from mllm.generation import GenerationSettings

    kwargs = dict(gen_kwargs or {})
    ignored = sorted(set(kwargs) - HANDLED_GEN_KWARGS)
    if ignored:
        logger.warning(
            "dualtoken: ignoring generation kwargs %s (handled: %s)", ignored, sorted(HANDLED_GEN_KWARGS)
        )
    beams = kwargs.get("num_beams")
    if beams not in (None, 1):
        raise ValueError(
            f"gen_kwargs num_beams={beams!r}: the dualtoken adapter decodes without beam search (1)"
        )
    temperature = float(kwargs.get("temperature") or 0.0)
    if temperature < 0:
        raise ValueError(f"gen_kwargs temperature must be >= 0, got {temperature}")
    do_sample = kwargs.get("do_sample")
    do_sample = temperature > 0 if do_sample is None else bool(do_sample)
    max_new_tokens = kwargs.get("max_new_tokens")
    return GenerationSettings(
        max_new_tokens=default_max_new_tokens
        if max_new_tokens is None
        else _as_int(max_new_tokens, "max_new_tokens", 1),
        temperature=(temperature if temperature > 0 else 1.0) if do_sample else 0.0,
        top_p=1.0 if kwargs.get("top_p") is None else float(kwargs["top_p"]),
        top_k=0 if kwargs.get("top_k") is None else _as_int(kwargs["top_k"], "top_k", 0),
        stop_strings=_stop_strings(kwargs.get("until")),
        seed=seed,
    )


def _settings_key(gen_kwargs: dict | None) -> str:
    return json.dumps(gen_kwargs or {}, sort_keys=True, default=repr)


class DualTokenLMMS(lmms):
    """A DualToken-MLLM checkpoint behind lmms-eval's simple-model interface (see the module docstring)."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_new_tokens: int = 256,
        seed: int = 0,
        system_prompt: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise ValueError(
                f"dualtoken: unknown model args {sorted(unused)}; expected pretrained, device, dtype, batch_size, "
                "max_new_tokens, seed, system_prompt"
            )
        if not pretrained:
            raise ValueError("dualtoken: model arg pretrained=CHECKPOINT_DIR is required")
        if str(batch_size).startswith("auto"):
            raise ValueError(
                f"dualtoken: --batch_size {batch_size}: give a number (automatic sizing is not supported)"
            )
        del max_batch_size  # lmms-eval passes it for automatic batch sizing only
        self.batch_size_per_gpu = _as_int(batch_size, "batch_size", 1)
        self.default_max_new_tokens = _as_int(max_new_tokens, "max_new_tokens", 1)
        self.seed = _as_int(seed, "seed", 0)
        import torch

        from mllm.checkpoint import load_checkpoint

        if device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self._model, self._processor = load_checkpoint(pretrained, device=device, dtype=dtype)
        self._device = self._model.device
        self.system_prompt = self._resolve_system_prompt(system_prompt) if system_prompt else None

    @property
    def model(self):
        return self._model

    @property
    def processor(self):
        return self._processor

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ prompts

    def _visuals(self, doc_to_visual: Callable, task: str, split: str, doc_id: Any) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        return self._check_visuals(visuals, task, doc_id)

    @staticmethod
    def _check_visuals(visuals: Any, task: str, doc_id: Any) -> list:
        from PIL import Image

        if visuals is None:
            return []
        if isinstance(visuals, Image.Image):
            return [visuals]
        visuals = list(visuals)
        for index, visual in enumerate(visuals):
            if not isinstance(visual, Image.Image):
                shown = visual if isinstance(visual, str) else type(visual).__name__
                raise ValueError(
                    f"task {task} doc {doc_id}: visual {index} is {shown!r}; the dualtoken adapter takes images "
                    "(PIL) only, not video or audio"
                )
        return visuals

    def conversation(self, context: str, num_images: int, where: str = "") -> list[dict]:
        """The messages for one request: optional system prompt + one user turn with the image placeholders."""
        if not isinstance(context, str):
            raise ValueError(f"{where}context must be a string, got {type(context).__name__}")
        count = context.count(IMAGE_PLACEHOLDER)
        if count == 0 and num_images:
            context = f"{IMAGE_PLACEHOLDER}\n" * num_images + context
        elif count != num_images:
            raise ValueError(
                f"{where}the context has {count} {IMAGE_PLACEHOLDER} placeholders but doc_to_visual gave "
                f"{num_images} images; use one placeholder per image, or none to put them all first"
            )
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*messages, {"role": "user", "content": context}]

    def _generate(self, rows: Sequence[tuple[int, str, list, str]], settings) -> list[str]:
        """(request index, context, images, where) per row -> reply texts. Rows go to `generate_chat` in runs of
        consecutive request indices whose seed is `seed + first index`, so request i always samples from stream
        seed + i, whatever the batch size or the other rows."""
        from mllm.generation import generate_chat

        texts: list[str] = []
        for run in contiguous_batches(list(rows), len(rows), lambda row: row[0]):
            conversations = [
                self.conversation(context, len(images), where) for _, context, images, where in run
            ]
            replies = generate_chat(
                self._model,
                self._processor,
                conversations,
                [row[2] for row in run],
                settings.with_overrides(seed=settings.seed + run[0][0]),
            )
            texts.extend(reply.text for reply in replies)
        return texts

    def _batches(self, requests: Sequence[Instance], key: Callable[[tuple], Any]):
        """(generation settings, request indices) per batch: requests grouped by `key(args)` (their generation
        kwargs at least), each batch at most `batch_size` consecutive indices of one group."""
        groups: dict[Any, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(key(request.args), []).append(index)
        for group in groups.values():
            settings = generation_settings(requests[group[0]].args[1], self.default_max_new_tokens, self.seed)
            for batch in contiguous_batches(group, self.batch_size, lambda i: i):
                yield settings, batch

    # ------------------------------------------------------------------ lmms-eval interface

    def generate_until(self, requests: list[Instance]) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dualtoken generate_until", disable=self.rank != 0)
        for settings, batch in self._batches(requests, lambda args: _settings_key(args[1])):
            rows = []
            for i in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[i].args
                images = self._visuals(doc_to_visual, task, split, doc_id)
                rows.append((i, context, images, f"task {task} doc {doc_id}: "))
            for i, text in zip(batch, self._generate(rows, settings)):
                results[i] = text
                context, gen_kwargs = requests[i].args[:2]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(batch))
        bar.close()
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        results: list[list[str] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="dualtoken generate_until_multi_round", disable=self.rank != 0)
        for settings, batch in self._batches(
            requests, lambda args: (args[5], args[6], _settings_key(args[1]))
        ):
            rounds: dict[int, list[str]] = {i: [] for i in batch}
            info: dict[int, Any] = {i: None for i in batch}
            pending = []
            for i in batch:
                context, _, doc_to_visual, _, doc_id, task, split = requests[i].args
                pending.append((i, context, self._visuals(doc_to_visual, task, split, doc_id)))
            round_idx = 0
            while pending:
                rows = []
                for i, context, images in pending:
                    doc_id, task = requests[i].args[4:6]
                    rows.append((i, context, images, f"task {task} doc {doc_id} round {round_idx}: "))
                for i, text in zip([row[0] for row in rows], self._generate(rows, settings)):
                    rounds[i].append(text)
                round_idx += 1
                still = []
                for i, _, _ in pending:
                    _, _, _, doc_to_text, doc_id, task, split = requests[i].args
                    visuals, context, terminal, round_res, info[i] = doc_to_text(
                        self.task_dict[task][split][doc_id],
                        previous_output=list(rounds[i]),
                        round_idx=round_idx,
                        previous_round_info=info[i],
                    )
                    if round_res is not None:
                        rounds[i] = list(round_res)
                    if not terminal:
                        still.append((i, context, self._check_visuals(visuals, task, doc_id)))
                pending = still
            for i in batch:
                results[i] = rounds[i]
                context, gen_kwargs = requests[i].args[:2]
                self.cache_hook.add_partial("generate_until_multi_round", (context, gen_kwargs), rounds[i])
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            f"the dualtoken lmms-eval adapter (eval/lmms_adapter.py) supports {SUPPORTED} tasks only; "
            "loglikelihood and multiple_choice tasks need per-token scores, which it does not compute"
        )
