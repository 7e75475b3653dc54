"""Fine-tuning on the offline loop's output: the data rendering TRL's trainers take."""
