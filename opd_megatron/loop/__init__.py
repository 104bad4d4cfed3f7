"""The training loops: `sft.py` (supervised fine-tuning, the synthetic tasks' teachers and baselines), `opd.py`
(on-policy distillation: prompts -> rollouts -> teacher scores -> objective -> update -> evaluation),
`objective.py` (the OPD loss of one micro-batch on TP-sharded logits) and `metrics.py` (progress bar,
metrics.jsonl, TensorBoard)."""
