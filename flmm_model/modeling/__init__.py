"""The network, tensors only: a prepared batch -> attention maps and hidden states -> coarse and refined logits ->
losses.

    batch.py        collated batch -> `PreparedBatch` on the host (LMM inputs, the heads' indices and targets): the
                    one route, callable in the loader's workers or in the main process
    lmm_inputs.py   host side of the LMM stage: validation, vision-token expansion, M-RoPE positions, indices
    lmm.py          the frozen LMM (device side): one forward, attention capture, phrase hidden states; generate
    attention.py    the capture: phrase-row softmax recomputed inside SDPA (or eager, F-LMM's way)
    mask_head.py    attention maps -> coarse mask logits (U-Net)
    sam_refiner.py  phrase hidden states -> SAM prompt tokens; coarse logits + tokens -> refined logits
    sam2_refiner.py the same refiner for SAM2 / SAM2.1 (its frame, high-resolution features); `refiner_for` picks
    frames.py       the sizes an image takes on each canvas, and the batched resize between them
    losses.py       BCE + Dice
"""
