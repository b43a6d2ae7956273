"""What one `fireredasr-transcribe` run is asked to do: the command's options, checked together.

Read by the command (`transcribe.py`) and by the Ray runner (`ray_transcription.py`),
which ships a `Job` to its engine replicas.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .decoding import GREEDY, Decoding
from .transcript_formats import SUBTITLE_FORMATS


class JobError(ValueError):
    """Options that do not go together (the command's usage errors)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What to transcribe into and how: the command's options (see `fireredasr-transcribe --help`).

    `dtype` "auto" is the repo's dtype; `engine` "ray" runs `num_replicas` vLLM
    engines on the Ray cluster at `ray_address` (None: a local one).
    """

    model: str
    output: Path | None = None
    format: str = "text"
    resume: bool = False
    overwrite: bool = False
    segment: str = "auto"
    backend: str = "vllm"
    engine: str = "vllm"
    decoding: Decoding = GREEDY
    batch_size: int = 64
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    seed: int = 0
    num_replicas: int = 1
    ray_address: str | None = None
    quiet: bool = False

    def __post_init__(self):
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))
        if self.resume and self.output is None:
            raise JobError("--resume needs --output: the file or folder to continue")
        if self.resume and self.overwrite:
            raise JobError("--resume keeps OUTPUT and --overwrite replaces it: choose one")
        if self.format in SUBTITLE_FORMATS and self.output is None:
            raise JobError(f"--format {self.format} writes one file per recording: give the folder as --output DIR")
        if self.backend == "reference" and self.tensor_parallel_size > 1:
            raise JobError("--tensor-parallel-size applies to --backend vllm only")
        if self.backend == "reference" and self.engine == "ray":
            raise JobError("--engine ray runs vLLM engines: drop --backend reference")
        if self.engine != "ray" and (self.num_replicas != 1 or self.ray_address is not None):
            raise JobError("--num-replicas and --ray-address apply to --engine ray only")
