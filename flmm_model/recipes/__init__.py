"""The jobs of `run.py`, one per module: train, evaluate, pretrain_lmm, cache_sam, convert_sam (with pointing, the
frozen LMM's own grounding score). They share `loop.py` and `scoring.py` and never import each other."""
