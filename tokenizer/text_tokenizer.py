"""The text tokenizer for presets without a base-LLM tokenizer: a SentencePiece model trained on a recipe's text and
wrapped as an HF fast tokenizer (`tokenizer.json`, loadable with `AutoTokenizer.from_pretrained`).

- `train_text_tokenizer(texts, out_dir, ...)` trains SentencePiece (BPE or unigram) from an in-memory sentence
  iterator, deterministically (one thread, fixed seed: the same texts and seed give the same model bytes), and writes
  the directory atomically (built in a temporary sibling, then moved into place).
- SentencePiece runs with identity normalization, no whitespace folding, split digits and byte fallback, so every
  string (newlines, unseen characters) decodes back to itself. The HF tokenizer reproduces SentencePiece's ids: the
  pieces become a `tokenizers` BPE (merges ranked by piece order) or Unigram model behind a Metaspace pre-tokenizer.
- `special_tokens` (none by default; the MLLM passes its `<image>`, `<boi>`, `<eoi>`, `<img>` and chat turn markers,
  `mllm.sequence.SPECIAL_TOKENS`, and the tiny preset fixed prompt strings, `mllm.sequence.PROMPT_PIECES`) become
  SentencePiece user-defined symbols and HF special tokens: one id each, never split; one may hold spaces (a fixed
  instruction), which SentencePiece matches as metaspaces. Ids: unk 0, bos 1, eos 2, pad 3; a bos is
  prepended by default (`add_special_tokens=True`), no eos. The chat template belongs to `mllm.processor`.
- A `vocab_size` larger than the text supports is capped automatically to SentencePiece's maximum (a warning says
  so, and `sentencepiece_settings.json` records requested and actual sizes); one too small to hold every character
  plus the 256 byte pieces raises ValueError naming the minimum.
- `texts_from_dataset(path)` collects the training text of a shapes-world dataset directory (captions,
  conversations, VQA questions, T2I prompts, class names) or of a LLaVA / COCO-captions JSON, prompt JSONL or plain
  text file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from data_recipes.atomic_io import atomic_directory_write

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SETTINGS_NAME = "sentencepiece_settings.json"
SPM_MODEL_NAME = "tokenizer.model"
_METASPACE = "▁"
# SentencePiece piece types (sentencepiece_model.proto): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, BYTE 6.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")


def _train_spm(
    texts: Sequence[str], vocab_size: int, model_type: str, specials: Sequence[str], seed: int
) -> bytes:
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        pad_piece=PAD,
        # SentencePiece matches user-defined symbols after replacing spaces with the metaspace.
        user_defined_symbols=[t.replace(" ", _METASPACE) for t in specials],
        num_threads=1,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return model.getvalue()


def _bpe_merges(pieces: Sequence[tuple[str, int]]) -> list[tuple[str, str]]:
    """Merges that rebuild SentencePiece BPE: every split of a normal piece into two pieces, ranked by the merged
    piece's id (SentencePiece merges the highest-scoring, i.e. lowest-id, pair first)."""
    ids = {piece: index for index, (piece, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, index in ids.items():
        splits = [
            (ids[piece[:cut]], ids[piece[cut:]], piece[:cut], piece[cut:])
            for cut in range(1, len(piece))
            if piece[:cut] in ids and piece[cut:] in ids
        ]
        ranked += [(index, left_id, right_id, left, right) for left_id, right_id, left, right in splits]
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _hf_tokenizer(model_bytes: bytes, specials: Sequence[str]) -> PreTrainedTokenizerFast:
    """The HF fast tokenizer equivalent to the SentencePiece model `model_bytes`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    # A user-defined piece is matched whole before pre-tokenization, so HF holds it with its spaces restored.
    pieces = [
        (p.piece.replace(_METASPACE, " ") if p.type == _USER_DEFINED else p.piece, p.type)
        for p in proto.pieces
    ]
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: index for index, (piece, _) in enumerate(pieces)}
        model = BPE(vocab, _bpe_merges(pieces), unk_token=UNK, fuse_unk=True, byte_fallback=True)
    else:
        scores = [(piece, p.score) for (piece, _), p in zip(pieces, proto.pieces)]
        model = Unigram(scores, unk_id=proto.trainer_spec.unk_id, byte_fallback=True)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="first", split=True
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace(_METASPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    controls = [piece for piece, kind in pieces if kind in (_CONTROL, _USER_DEFINED) or piece == UNK]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in controls])
    bos_id = pieces.index((BOS, _CONTROL))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=list(specials),
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def train_text_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    model_type: Literal["bpe", "unigram"] = "bpe",
    special_tokens: Sequence[str] = (),
    seed: int = 0,
) -> PreTrainedTokenizerBase:
    """Train SentencePiece on `texts` and write an HF tokenizer directory to `out_dir`; return it loaded from there.

    Deterministic: the same texts (same order), settings and seed give byte-identical `tokenizer.model` files.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type: expected 'bpe' or 'unigram', got {model_type!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size!r}")
    specials = list(dict.fromkeys(special_tokens))
    clashes = [t for t in specials if t in (UNK, BOS, EOS, PAD) or not t or t.isspace() or _METASPACE in t]
    if clashes:
        raise ValueError(
            f"special_tokens: {clashes!r} are reserved, blank or hold the metaspace {_METASPACE!r} "
            "(unk/bos/eos/pad are always present)"
        )
    corpus = [t for t in texts if t and not t.isspace()]
    if not corpus:
        raise ValueError("texts: no non-blank text to train the tokenizer on")
    actual = vocab_size
    try:
        model_bytes = _train_spm(corpus, vocab_size, model_type, specials, seed)
    except RuntimeError as error:
        too_low, too_high = _TOO_LOW.search(str(error)), _TOO_HIGH.search(str(error))
        if too_low:
            raise ValueError(
                f"vocab_size: {vocab_size} cannot hold the {too_low.group(2)} required pieces (every character of "
                f"the text, 256 byte pieces, 4 controls and {len(specials)} special tokens); use at least "
                f"{too_low.group(2)}"
            ) from error
        if not too_high:
            raise
        actual = int(too_high.group(2))
        warnings.warn(
            f"vocab_size: the text supports at most {actual} {model_type} pieces; capped {vocab_size} -> {actual}",
            stacklevel=2,
        )
        model_bytes = _train_spm(corpus, actual, model_type, specials, seed)
    tokenizer = _hf_tokenizer(model_bytes, specials)
    settings = {
        "model_type": model_type,
        "requested_vocab_size": vocab_size,
        "vocab_size": actual,
        "special_tokens": specials,
        "seed": seed,
        "texts": len(corpus),
        "texts_sha256": hashlib.sha256("\n\0".join(corpus).encode()).hexdigest(),
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
    }

    def write(tmp: Path) -> None:
        (tmp / SPM_MODEL_NAME).write_bytes(model_bytes)
        tokenizer.save_pretrained(tmp)
        (tmp / SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    atomic_directory_write(out_dir, write)
    return load_text_tokenizer(out_dir)


@contextlib.contextmanager
def transformers_errors_only():
    """Raise transformers' log level to errors for a block. Loading from a teacher directory (a SiglipModel
    `config.json`) makes transformers validate a default SiglipTextConfig (vocabulary 32000, bos 49406) before the
    saved one replaces it, and a SiglipModel directory read as a vision tower reports its text weights as
    unexpected: both are expected here and would only be noise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_text_tokenizer(directory: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer directory written by `train_text_tokenizer` (any HF tokenizer directory works)."""
    path = Path(directory)
    if not (path / "tokenizer.json").is_file() and not (path / SPM_MODEL_NAME).is_file():
        raise FileNotFoundError(
            f"load_text_tokenizer: {path} holds neither tokenizer.json nor {SPM_MODEL_NAME}"
        )
    with transformers_errors_only():
        return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------------- corpora
def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read JSON ({error})") from error


def _json_texts(path: Path) -> Iterator[str]:
    """Texts of a LLaVA conversation list or a COCO captions file."""
    payload = _read_json(path)
    if isinstance(payload, list):
        for index, record in enumerate(payload):
            turns = record.get("conversations") if isinstance(record, dict) else None
            if not isinstance(turns, list):
                raise ValueError(f"{path}[{index}].conversations: expected a list of turns (LLaVA format)")
            for turn in turns:
                if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                    yield turn["value"]
    elif isinstance(payload, dict) and isinstance(payload.get("annotations"), list):
        for annotation in payload["annotations"]:
            if isinstance(annotation, dict) and isinstance(annotation.get("caption"), str):
                yield annotation["caption"]
    else:
        raise ValueError(f"{path}: expected a LLaVA conversation list or a COCO captions object")


def _jsonl_prompts(path: Path) -> Iterator[str]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{number}: expected an object with a string 'prompt'")
        yield prompt


def _shapes_texts(root: Path, split: str) -> Iterator[str]:
    manifest = _read_json(root / "manifest.json")
    files = manifest.get("files", {}).get(split) if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"{root / 'manifest.json'}: no files listed for split {split!r}")
    yield from _json_texts(root / files["captions"])
    yield from _json_texts(root / files["llava"])
    questions = _read_json(root / files["vqa_questions"]).get("questions", [])
    yield from (q["question"] for q in questions if isinstance(q.get("question"), str))
    yield from _jsonl_prompts(root / files["prompts"])
    if (root / "classes.json").is_file():
        yield from _read_json(root / "classes.json").get("classes", [])


def texts_from_dataset(path: str | os.PathLike, split: str = "train") -> list[str]:
    """Every text of a dataset, in a fixed order: a shapes-world directory (`split` picks the split), a LLaVA or COCO
    captions `.json`, a prompt `.jsonl` (one {"prompt": ...} per line) or a `.txt` file (one text per line)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise ValueError(f"{path}: a dataset directory needs a manifest.json (a shapes-world dataset)")
        return list(_shapes_texts(path, split))
    if not path.is_file():
        raise FileNotFoundError(f"texts_from_dataset: {path} does not exist")
    if path.suffix == ".json":
        return list(_json_texts(path))
    if path.suffix == ".jsonl":
        return list(_jsonl_prompts(path))
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"{path}: expected a dataset directory or a .json, .jsonl or .txt file")
