"""One decoder replica of `fireredasr-transcribe --engine ray`: a stream of segments in, transcripts out.

Holds `EngineReplica`, the Ray actor class the driver
(`fireredasr_vllm.ray_transcription`) runs `--num-replicas` times. Each holds
one decoder (a vLLM engine with the plugin: `transcribe.VllmBackend`) and
feeds it from an inbox that the driver keeps filled, so the engine's
continuous batch stays full across the driver's deliveries instead of draining
at each one. Does not read audio, assemble recordings or write anything.

Imports neither torch nor vLLM: the decoder comes from a factory the driver
passes in, so a replica process loads only what its decoder needs.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator

import numpy as np

# How long the engine waits for a new segment, when it has room for one and the inbox is
# empty, before it lets the requests in flight finish without more: a few decoding steps
# held up now and then, against a drain (the batch emptying down to its longest clip)
# each time a delivery comes a moment late.
STARVED_WAIT_S = 0.1
# While a replica holds work it answers `results` once it has decoded `answer_at` segments
# since its last answer, or once this long has passed and it has some: the driver makes one
# call per `answer_at` segments at high rates, and at most a few per second at low ones.
REPLY_INTERVAL_S = 0.5
# `results` returns after this long even without a result, so the driver notices a
# replica that died.
POLL_S = 2.0


def error_text(error: BaseException) -> str:
    """An error as the text a result carries: never empty, since empty means no error."""
    return str(error) or type(error).__name__


class EngineReplica:
    """A Ray actor: one decoder fed from an inbox of segments, in one continuous batch.

    `push` takes the driver's deliveries (audio object references and the keys
    of the segments to decode from them) as soon as the replica has room for
    them; the driver does not wait for it. `results` hands back what is decoded
    since the last call (the driver keeps one in flight per replica that holds
    work), with the replica's incarnation: a replica that Ray restarted has a new
    one, so the driver learns that the segments it pushed before are lost even
    when no call of its own failed. A decoding thread
    runs the decoder's own loop (`decoder.transcribe`, i.e.
    `offline.transcriptions` for vLLM) over the inbox for as long as segments
    keep coming; when the inbox stays empty for `STARVED_WAIT_S` it lets the
    requests in flight finish and waits for the next delivery.
    """

    def __init__(self, make_decoder: Callable[[], object], decoding, batch_size: int, answer_at: int = 1):
        # Replicas may share a node's cores: vLLM's CPU backend would bind every one of them to all cores.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        self.decoder = make_decoder()
        self.incarnation = uuid.uuid4().hex
        self.decoding, self.batch_size, self.answer_at = decoding, batch_size, answer_at
        self.inbox: queue.Queue = queue.Queue()
        self.ready = threading.Condition()
        self.done: list[tuple[Hashable, str, str]] = []
        self.failure: BaseException | None = None
        self.last_reply = 0.0
        # Where the replica's time goes, for the benchmark (`stats`).
        self.counters = {"segments": 0, "sessions": 0, "fetch_s": 0.0, "idle_s": 0.0, "starved_s": 0.0}
        threading.Thread(target=self._decode_forever, name="replica-decoder", daemon=True).start()

    # --- called by the driver ---------------------------------------------------

    def push(self, deliveries: list[tuple[list, list[tuple[Hashable, int]]]]) -> None:
        """Queue segments: each delivery is `([audio reference], [(key, position), ...])`.

        The reference comes wrapped in a list so that Ray hands it over
        unresolved; it is fetched here, outside the decoding thread, which never
        waits on the object store. A delivery whose audio cannot be fetched gives
        each of its segments that error.
        """
        self._take(deliveries)

    def results(self) -> tuple[str, list[tuple[Hashable, str, str]]]:
        """The incarnation, and what is decoded since the last call as `(key, text, error)`: once there
        are `answer_at` results, or some and `REPLY_INTERVAL_S` has passed since the last answer, or
        after `POLL_S`."""
        deadline = time.monotonic() + POLL_S

        def answer() -> bool:
            if self.failure is not None:
                return True
            return len(self.done) >= self.answer_at or bool(self.done) and \
                time.monotonic() - self.last_reply >= REPLY_INTERVAL_S  # fmt: skip

        with self.ready:
            while not answer() and (left := deadline - time.monotonic()) > 0:
                self.ready.wait(min(left, REPLY_INTERVAL_S))
            if self.failure is not None:
                raise RuntimeError(f"the replica's decoder failed: {type(self.failure).__name__}: "
                                   f"{error_text(self.failure)}") from self.failure  # fmt: skip
            done, self.done = self.done, []
            self.last_reply = time.monotonic()
        return self.incarnation, done

    def _take(self, deliveries) -> None:
        start = time.monotonic()
        import ray  # the actor runs under Ray, which is imported by then

        for (reference,), segments in deliveries:
            try:
                audio = ray.get(reference)
            except ray.exceptions.RayError as error:
                with self.ready:
                    self.done += [(key, "", f"its audio was lost: {error_text(error)}") for key, _ in segments]
                    self.ready.notify_all()
                continue
            for key, position in segments:
                self.inbox.put((key, audio[position]))
        self.counters["fetch_s"] += time.monotonic() - start

    def stats(self) -> dict:
        """The replica's counters, and its decoder's own if it keeps some (the benchmark's engine does)."""
        decoder_stats = getattr(self.decoder, "stats", None)
        return {**self.counters, "pid": os.getpid(), **(decoder_stats() if decoder_stats else {})}

    # --- the decoding thread ------------------------------------------------------

    def _segments(self, first) -> Iterator[tuple[Hashable, np.ndarray]]:
        """The inbox as the decoder's clip stream: ends once it stays empty for `STARVED_WAIT_S`."""
        item = first
        while True:
            key, samples = item
            # A copy: arrays over the object store are read-only, which torch warns about when it wraps them.
            yield key, np.array(samples, dtype=np.float32)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                waited = time.monotonic()
                try:
                    item = self.inbox.get(timeout=STARVED_WAIT_S)
                except queue.Empty:
                    return
                finally:
                    self.counters["starved_s"] += time.monotonic() - waited

    def _decode_forever(self) -> None:
        try:
            while True:
                waited = time.monotonic()
                first = self.inbox.get()
                self.counters["idle_s"] += time.monotonic() - waited
                self.counters["sessions"] += 1
                for key, outcome in self.decoder.transcribe(self._segments(first), self.decoding,
                                                            batch_size=self.batch_size):  # fmt: skip
                    text, error = ("", error_text(outcome)) if isinstance(outcome, Exception) else (outcome.text, "")
                    with self.ready:
                        self.done.append((key, text, error))
                        self.counters["segments"] += 1
                        self.ready.notify_all()
        except BaseException as failure:  # the decoder itself broke: the driver hears it at its next call
            with self.ready:
                self.failure = failure
                self.ready.notify_all()

    def __del__(self):
        # Ray ends the actor when the run is done: end the engine's processes with it.
        decoder = getattr(self, "decoder", None)
        if decoder is not None:
            decoder.close()
