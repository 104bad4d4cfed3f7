"""Vocab-parallel twins of the OPD math on TP-sharded logits: `vocab_parallel.py` (normaliser, token log-probs,
entropy, full-vocabulary divergences, chunked along tokens; the shard layout `Shard`, the TP autograd ops
`ReduceFromTP` / `CopyToTP`, `check_inputs` and `chunked_rows` that the other modules build on), `topk.py`
(distributed top-k / top-p, sparse server ids scattered to their owning ranks), `supports.py` (top-k / union
supports, renormalised or tail, dense or sparse teacher), `routing.py` (CR-OPD), `stats.py` (teacher confidence and
entropies, top-k overlap, student mass on the teacher's support), `fused.py` (the output layer and the loss fused:
from final hidden states and the output-weight shard, chunk by chunk, logits recomputed in backward; megatron's
sequence-parallel hidden layout accepted). Each function communicates only small all-reduces (or k candidates per
rank) over the tensor-parallel group and is held equal to its single-device reference by a test."""
