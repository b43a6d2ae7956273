"""Synthetic training and held-out speech for the demo model: digit strings read by espeak-ng.

The closed vocabulary is the ten digits in English and in Mandarin, read digit by
digit and transcribed as spoken (`three seven one`, `三七一`). Each utterance gets
its own voice variant, speed (120-200 words/min), pitch, leading and trailing
silence, level and background noise. The held-out set uses voice variants that
training never hears and digit strings training never sees.

espeak-ng (a Debian package: `apt-get install espeak-ng`) is needed to make data,
never to use the shipped model: `python -m fireredasr_vllm.demo.train` installs
it when it is missing.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fireredasr_converter import spec

ENGLISH_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MANDARIN_DIGITS = "零一二三四五六七八九"
LANGUAGES = ("en", "zh")
MIN_DIGITS, MAX_DIGITS = 3, 8

# espeak-ng voices per language and the voice variants (timbre, pitch range) they are read with.
VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd"),
    "zh": ("cmn",),
}
# Natural-sounding variants; whispered, robotic and effect variants are left out.
TRAINING_VARIANTS = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "Alex", "Andy", "Annie", "aunty",
    "belinda", "benjamin", "caleb", "david", "ed", "edward", "Gene", "Henrique", "Hugo", "iven", "Jacky",
    "john", "Lee", "linda", "Marco", "max", "Michael", "Mike", "norbert", "paul", "pedro", "quincy",
    "rob", "robert", "sandro", "shelby", "steph", "travis", "victor", "zac", "anika", "klatt", "klatt2",
)  # fmt: skip
HELDOUT_VARIANTS = ("m7", "f5", "adam", "Alicia", "boris", "grandma", "michel", "steph3")
SPEED_RANGE = (120, 200)  # words per minute
PITCH_RANGE = (25, 75)  # espeak-ng's 0-99 scale

ESPEAK_RATE = 22050


@dataclass(frozen=True)
class Utterance:
    uttid: str
    language: str
    digits: str  # e.g. "371"
    voice: str  # "en-us+m3"
    speed: int
    pitch: int

    @property
    def text(self) -> str:
        """The transcript, as spoken: words separated by spaces in English, characters in Mandarin."""
        if self.language == "en":
            return " ".join(ENGLISH_DIGITS[int(d)] for d in self.digits)
        return "".join(MANDARIN_DIGITS[int(d)] for d in self.digits)


def transcript_corpus() -> list[str]:
    """Text for the tokenizer to learn: frequent enough that every digit word (with and
    without its leading space) and every digit character becomes a token of its own."""
    words = [*ENGLISH_DIGITS, *(" " + word for word in ENGLISH_DIGITS), *MANDARIN_DIGITS]
    return words * 64


def plan_utterances(count: int, seed: int, variants: tuple[str, ...], exclude_digits: set[str], prefix: str) -> list[Utterance]:
    """`count` utterances, half per language, drawn deterministically from `seed`."""
    rng = random.Random(seed)
    plans = []
    while len(plans) < count:
        language = LANGUAGES[len(plans) % len(LANGUAGES)]
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
        if digits in exclude_digits:
            continue
        variant = rng.choice(variants)
        voice = rng.choice(VOICES[language]) + (f"+{variant}" if variant else "")
        plans.append(
            Utterance(
                uttid=f"{prefix}{len(plans):05d}-{language}",
                language=language,
                digits=digits,
                voice=voice,
                speed=rng.randint(*SPEED_RANGE),
                pitch=rng.randint(*PITCH_RANGE),
            )
        )
    return plans


def require_espeak() -> str:
    """The espeak-ng executable; installs the Debian package when it is missing (root, apt)."""
    found = shutil.which("espeak-ng")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        raise SystemExit("espeak-ng is not installed and apt-get is not available: install espeak-ng first")
    subprocess.run([apt, "update", "-qq"], check=True)
    subprocess.run([apt, "install", "-y", "-qq", "espeak-ng"], check=True)
    found = shutil.which("espeak-ng")
    if not found:
        raise SystemExit("installing espeak-ng did not put `espeak-ng` on PATH")
    return found


def resample(samples: np.ndarray, rate: int, target: int = spec.SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of a whole clip through its spectrum (deterministic, no dependencies)."""
    if rate == target:
        return samples.astype(np.float32)
    length = int(round(len(samples) * target / rate))
    spectrum = np.fft.rfft(samples)
    kept = np.zeros(length // 2 + 1, dtype=spectrum.dtype)
    bins = min(len(kept), len(spectrum))
    kept[:bins] = spectrum[:bins]
    return (np.fft.irfft(kept, n=length) * (length / len(samples))).astype(np.float32)


def synthesize(espeak: str, utterance: Utterance) -> np.ndarray:
    """espeak-ng's reading of the utterance: 16 kHz float32 in [-1, 1], no added silence or noise."""
    spoken = " ".join(ENGLISH_DIGITS[int(d)] if utterance.language == "en" else MANDARIN_DIGITS[int(d)]
                      for d in utterance.digits)  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        subprocess.run(
            [espeak, "-v", utterance.voice, "-s", str(utterance.speed), "-p", str(utterance.pitch), "-w", out.name, spoken],
            check=True,
            capture_output=True,
        )
        with wave.open(out.name) as reader:
            rate = reader.getframerate()
            pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype="<i2")
    return resample(pcm.astype(np.float32) / 32768.0, rate)


def trim_silence(samples: np.ndarray, threshold: float = 1e-3) -> np.ndarray:
    loud = np.flatnonzero(np.abs(samples) > threshold)
    return samples[loud[0] : loud[-1] + 1] if loud.size else samples


def augment(samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Leading/trailing silence (0.05-0.4 s), level -18..0 dB, white and low-passed noise at 15-40 dB SNR."""
    rate = spec.SAMPLE_RATE
    lead, tail = (int(rng.uniform(0.05, 0.4) * rate) for _ in range(2))
    clip = np.concatenate([np.zeros(lead), trim_silence(samples), np.zeros(tail)])
    clip *= 10 ** (rng.uniform(-18.0, 0.0) / 20) / max(np.abs(clip).max(), 1e-6) * 0.9
    noise = rng.standard_normal(len(clip))
    if rng.random() < 0.5:
        noise = np.convolve(noise, np.ones(8) / 8, mode="same")  # a duller hum-like noise
    speech_power = np.mean(clip[lead : len(clip) - tail] ** 2) + 1e-12
    snr_db = rng.uniform(15.0, 40.0)
    noise *= np.sqrt(speech_power / (10 ** (snr_db / 10)) / (np.mean(noise**2) + 1e-12))
    return np.clip(clip + noise, -1.0, 1.0).astype(np.float32)


def render(utterances: list[Utterance], seed: int, workers: int = 2) -> list[np.ndarray]:
    """Synthesise and augment every utterance (espeak-ng runs `workers` at a time); input order kept."""
    espeak = require_espeak()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        clean = list(pool.map(lambda u: synthesize(espeak, u), utterances))
    return [augment(samples, np.random.default_rng([seed, index])) for index, samples in enumerate(clean)]


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(spec.SAMPLE_RATE)
        writer.writeframes(pcm.tobytes())


def write_kaldi_set(folder: Path, utterances: list[Utterance], waveforms: list[np.ndarray]) -> None:
    """16 kHz 16-bit WAVs plus Kaldi `wav.scp` (paths relative to the folder) and `text`."""
    folder.mkdir(parents=True, exist_ok=True)
    for utterance, samples in zip(utterances, waveforms):
        write_wav(folder / f"{utterance.uttid}.wav", samples)
    (folder / "wav.scp").write_text("".join(f"{u.uttid} {u.uttid}.wav\n" for u in utterances), encoding="utf-8")
    (folder / "text").write_text("".join(f"{u.uttid}\t{u.text}\n" for u in utterances), encoding="utf-8")
