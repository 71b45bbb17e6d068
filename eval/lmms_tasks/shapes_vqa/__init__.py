"""The `shapes_vqa` lmms-eval task: short-answer VQA on a shapes-world split, scored with the official VQAv2
soft accuracy. `prepare` turns a split into a task directory for lmms-eval's `--include_path`; `utils` holds the
hooks lmms-eval calls; `shapes_vqa_template.yaml` is the task definition without its data file."""
