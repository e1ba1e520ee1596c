"""``cpmkit release``: a shelf of verified artifacts with quality gates (``shelf``), TOML recipes (``recipe``),
model cards (``card``) and the Hugging Face upload (``hub``)."""
