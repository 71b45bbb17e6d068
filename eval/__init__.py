"""Evaluation: VQA accuracy, caption CIDEr-D/BLEU-4, text-to-image verification, the demo chain and its reports
(the top layer: it may import every other package)."""
