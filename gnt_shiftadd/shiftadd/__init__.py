"""ShiftAddViT primitives for GNT: shift linears, binary-hashed additive attention, Mult/Shift mixture of experts,
the in-place `reparameterize` conversion. Measuring them (op counts and energy, expert latency) lives in
gnt_shiftadd/evaluation/ (opcount.py, latency.py) with the other measurements."""
