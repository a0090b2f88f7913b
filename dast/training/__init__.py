"""Stage 1 (adversarial training), stage 2 (self-training) and their runtime."""
