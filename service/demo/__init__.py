"""`wherefrom demo`: a synthetic world of niche facts (`world`), a small GPT-2 trained on it with the
HF Trainer (`train`), and the run that indexes and traces it (`run`). The benchmarks build on these."""
