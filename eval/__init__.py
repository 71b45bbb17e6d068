"""Evaluation: VQA accuracy, caption CIDEr-D/BLEU-4, text-to-image verification, tokenizer metrics, reports."""
