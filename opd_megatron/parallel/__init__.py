"""Vocab-parallel twins of the OPD math on TP-sharded logits: `vocab_parallel.py` (normaliser, token log-probs,
entropy, full-vocabulary divergences, chunked along tokens), `topk.py` (distributed top-k / top-p, sparse server ids
scattered to their owning ranks), `supports.py` (top-k / union supports, renormalised or tail, dense or sparse
teacher), `stats.py` (teacher confidence and entropies, top-k overlap, student mass on the teacher's support).
Each function communicates only small all-reduces (or k candidates per rank) over the tensor-parallel group and is
held equal to its single-device reference by a test."""
