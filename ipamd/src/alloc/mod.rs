//! Pure allocation logic: pools, blocks, picking an address, cooldown. No I/O.
