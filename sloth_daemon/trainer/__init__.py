"""The trainer: one short LoRA update in a child process (`job` is the spec, `recipe` trains, `process` runs it)."""
