"""Vocab-parallel twins of the OPD math on TP-sharded logits: `vocab_parallel.py` (normaliser, token log-probs,
entropy, full-vocabulary divergences), `topk.py` (distributed top-k). Each function communicates only small
all-reduces over the tensor-parallel group and is held equal to its single-device reference by a test."""
