"""Stock vLLM on a `--target stock-vllm` export, in a process of its own.

test_stock_vllm.py runs it with VLLM_PLUGINS set so that vLLM loads no plugin:
the export must be served by vLLM's built-in FireRedASR2ForConditionalGeneration
alone. Each clip is decoded greedily from the prompt stock vLLM's transcription
endpoint builds (`get_generation_prompt`), once on its own and once in a batch.

    python tests/stock_vllm_worker.py JOB.json RESULT.json

JOB.json: {"repo": path, "clips": path of an .npz of float32 16 kHz clips,
"max_tokens": {clip name: int}, "solo": [clip names], "batched": [clip names]}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fireredasr_vllm.stock_serving import enable_stock_processor_without_torchvision

# At module level: vLLM's spawned engine processes re-run this file's top level, not main().
enable_stock_processor_without_torchvision()

PLUGIN_ARCHITECTURE = "FireRedAsrLlmForConditionalGeneration"


def main(job_path: Path, result_path: Path) -> None:
    from vllm import LLM, ModelRegistry, SamplingParams
    from vllm.config.speech_to_text import SpeechToTextParams
    from vllm.model_executor.models.fireredasr2 import FireRedASR2ForConditionalGeneration as Stock
    from vllm_helpers import ENGINE_KWARGS, NUM_LOGPROBS

    job = json.loads(job_path.read_text())
    clips = dict(np.load(job["clips"]))
    llm = LLM(model=job["repo"], dtype="float32", **ENGINE_KWARGS)
    try:
        model_config = llm.llm_engine.model_config
        stt_config = Stock.get_speech_to_text_config(model_config, "transcribe")

        def request(name: str) -> dict:
            return Stock.get_generation_prompt(
                SpeechToTextParams(audio=clips[name], stt_config=stt_config, model_config=model_config, language="zh")
            )

        def greedy(name: str) -> SamplingParams:
            return SamplingParams(temperature=0.0, max_tokens=job["max_tokens"][name], logprobs=NUM_LOGPROBS)

        def summary(output) -> dict:
            return {
                "prompt_token_ids": list(output.prompt_token_ids),
                "token_ids": list(output.outputs[0].token_ids),
                "logprobs": [
                    {str(token): logprob.logprob for token, logprob in step.items()}
                    for step in output.outputs[0].logprobs
                ],
            }

        solo = {name: summary(llm.generate(request(name), greedy(name), use_tqdm=False)[0]) for name in job["solo"]}
        batched_outputs = llm.generate(
            [request(name) for name in job["batched"]], [greedy(name) for name in job["batched"]], use_tqdm=False
        )
        result = {
            "plugin_registered": PLUGIN_ARCHITECTURE in ModelRegistry.get_supported_archs(),
            # The package itself is imported for its stock_serving shim; the plugin's
            # model code must not be.
            "plugin_imported": "fireredasr_vllm.model" in sys.modules,
            "architecture": model_config.architecture,
            "prompt": request(job["solo"][0])["prompt"],
            "max_audio_clip_s": stt_config.max_audio_clip_s,
            "sample_rate": stt_config.sample_rate,
            "audio_tokens_per_second": Stock.get_num_audio_tokens(1.0, stt_config, model_config),
            "solo": solo,
            "batched": {name: summary(output) for name, output in zip(job["batched"], batched_outputs)},
        }
    finally:
        # Not fireredasr_vllm.offline.shutdown_engine: this process must not import the plugin's package.
        llm.llm_engine.engine_core.shutdown()
    result_path.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
