"""Fine-tuning: the data (finetune.data: JSONL chat conversations into batches with labels on the answers)."""
