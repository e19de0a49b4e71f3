"""Evaluation: the metrics (FID / sFID / IS / precision-recall, tokenizer metrics, the classifier metric) behind
one interface and registry (evaluation.metrics), `generate` (FID-50k sample sets), `fid` and the trainer's
periodic evaluation. Layer: train and bench use it; it uses modeling and kernels only."""
