"""The DualToken visual tokenizer: one SigLIP-style tower, a pixel and a semantic residual-VQ branch, a pixel decoder;
its training (teacher included), the SentencePiece text tokenizer helpers and the image reconstruction metrics."""
