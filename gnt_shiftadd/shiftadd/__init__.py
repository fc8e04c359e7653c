"""ShiftAddViT primitives for GNT: shift linears, binary-hashed additive attention, Mult/Shift mixture of experts,
the in-place `reparameterize` conversion and the op-count/energy model."""
