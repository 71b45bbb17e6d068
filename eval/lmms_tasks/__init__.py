"""lmms-eval task definitions for DualToken-MLLM, one directory per task (see `eval.lmms_adapter`)."""
