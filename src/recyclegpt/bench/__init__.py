"""Measurements: decoding speed (`speed`, `recyclegpt bench`), quality of `recycle` (`quality`,
`recyclegpt eval`), prompt sets (`prompts`) and report output (`report`)."""
