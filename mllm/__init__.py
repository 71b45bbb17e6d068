"""The unified multimodal LLM: extended-vocabulary causal LM fed and decoded through DualToken codes."""
