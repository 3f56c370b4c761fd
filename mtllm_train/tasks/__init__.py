"""Stage 2: task data, heads, language codes (task fine-tuning and distillation build on these)."""
