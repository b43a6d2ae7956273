"""fireredasr-convert: a FireRedASR-LLM release -> one self-contained Hugging Face-style repo.

`fireredasr_converter.pipeline.convert` is the API, `fireredasr-convert` the command;
`docs/format.md` describes what they write.
"""

__version__ = "0.1.0"
