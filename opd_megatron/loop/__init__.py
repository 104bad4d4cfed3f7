"""The training loops and what they share: `train.py` (`train(cfg)`, the entry point: the loop that run.algorithm
names), `common.py` (the run directory, the parts a checkpoint keeps, the one save / resume / SIGTERM policy),
`sft.py` (supervised fine-tuning: the synthetic tasks' teachers and baselines), `opd.py` (on-policy distillation:
prompts -> rollouts -> teacher scores -> objective -> update), `teacher_scoring.py` (a served teacher's scores,
with overlap), `objective.py` (the OPD loss of one micro-batch on TP-sharded logits), `evaluation.py` (held-out
score and reverse KL), `metrics.py` (progress bar, metrics.jsonl, TensorBoard) and `report.py` (an OPD run's
report.md and plots)."""
