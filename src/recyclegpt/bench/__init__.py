"""Measurements: decoding speed (`speed`, `recyclegpt bench`), quality of `recycle` (`quality`,
`recyclegpt eval`), load on a running server (`serve_load`) and report output (`report`). The prompt sets they
run on are the package's (`recyclegpt.prompts`)."""
