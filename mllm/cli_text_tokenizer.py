"""`dualtoken mllm text-tokenizer`: train the tiny preset's SentencePiece text tokenizer on a dataset's text.

`register(mllm_subparsers)` is called by `mllm/cli.py`; the work is `tokenizer.text_tokenizer` (imported lazily).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


def _text_tokenizer(args) -> int:
    from mllm.sequence import PROMPT_PIECES, SPECIAL_TOKENS
    from tokenizer.text_tokenizer import texts_from_dataset, train_text_tokenizer

    try:
        texts = texts_from_dataset(args.data, split=args.split)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokenizer = train_text_tokenizer(
                texts,
                args.out,
                vocab_size=args.vocab_size,
                model_type=args.model_type,
                special_tokens=SPECIAL_TOKENS if args.spell_prompts else (*SPECIAL_TOKENS, *PROMPT_PIECES),
                seed=args.seed,
            )
    except (ValueError, FileNotFoundError) as error:
        print(f"dualtoken mllm text-tokenizer: error: {error}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    print(
        f"trained a {args.model_type} tokenizer of {len(tokenizer)} pieces on {len(texts)} texts -> {args.out}"
    )
    return 0


def register(mllm_subparsers) -> None:
    """Add `text-tokenizer` to the `dualtoken mllm` subcommands."""
    parser = mllm_subparsers.add_parser(
        "text-tokenizer",
        help="train a SentencePiece text tokenizer on a dataset's text (tiny preset)",
        description="Train SentencePiece on the text of a shapes-world dataset directory (captions, conversations, "
        "questions, prompts) or a LLaVA/COCO .json, prompt .jsonl or .txt file, and write an HF tokenizer "
        "directory (AutoTokenizer.from_pretrained). A --vocab-size above what the text supports is capped.",
    )
    parser.add_argument("--data", required=True, type=Path, help="dataset directory or text file")
    parser.add_argument("--out", required=True, type=Path, help="tokenizer directory to write")
    parser.add_argument(
        "--vocab-size", dest="vocab_size", type=int, default=1024, help="pieces (default 1024)"
    )
    parser.add_argument("--model-type", dest="model_type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--split", default="train", help="dataset split to read (default train)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--spell-prompts",
        dest="spell_prompts",
        action="store_true",
        help="do not hold the chat turn headers and the short-answer instruction as one piece each "
        "(mllm.sequence.PROMPT_PIECES); spelled out they take 20 of a short-answer VQA turn's ~36 tokens",
    )
    parser.set_defaults(func=_text_tokenizer)
