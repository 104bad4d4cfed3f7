"""Vocab-parallel twins of the OPD math on TP-sharded logits, each under the name of its single-device reference
in `math/`: `divergences.py` (normaliser, token log-probs, entropy, full-vocabulary divergences, chunked along
tokens), `supports.py` (top-k / union supports, renormalised or tail, dense or sparse teacher), `cr_opd.py`
(CR-OPD), `diagnostics.py` (teacher confidence and entropies, top-k overlap, student mass on the teacher's support).
Without a reference of their own: `shard.py` (what they all build on: the shard layout `Shard`, the input checks
and their debug switch, row chunking, the global normaliser, the TP autograd ops `ReduceFromTP` / `CopyToTP`),
`topk.py` (distributed top-k / top-p, sparse server ids scattered to their owning ranks), `fused.py` (the output
layer and the loss fused: from final hidden states and the output-weight shard, chunk by chunk, logits recomputed
in backward; megatron's sequence-parallel hidden layout accepted), `finite.py` (one agreed answer to "is anything
non-finite?"). Each function communicates only small all-reduces (or k candidates per rank) over the
tensor-parallel group and is held equal to its single-device reference by a test."""
