"""Training entry points: MLLM instruction tuning with HF Trainer, DeepSpeed ZeRO and peft LoRA."""
