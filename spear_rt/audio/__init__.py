"""Audio at the edge: codecs, resampling, voice activity detection and audio files.

Audio crosses module boundaries as a mono `NDArray[np.int16]` plus an explicit sample rate;
bytes are converted once, at the edge, with `decode_audio` / `encode_audio`.
"""

from spear_rt.audio.codecs import (
    AudioFormat,
    AudioFormatError,
    InputFormat,
    alaw_decode,
    alaw_encode,
    decode_audio,
    encode_audio,
    float32_to_int16,
    input_format_from_wire,
    input_format_to_wire,
    int16_to_float32,
    pcm16_from_bytes,
    pcm16_to_bytes,
    ulaw_decode,
    ulaw_encode,
)
from spear_rt.audio.files import frames, load_audio
from spear_rt.audio.resample import StreamResampler, resample
from spear_rt.audio.vad import (
    Detector,
    SpeechStarted,
    SpeechStopped,
    VadConfig,
    VadEvent,
    VoiceActivityDetector,
)

__all__ = [
    "AudioFormat",
    "AudioFormatError",
    "Detector",
    "InputFormat",
    "SpeechStarted",
    "SpeechStopped",
    "StreamResampler",
    "VadConfig",
    "VadEvent",
    "VoiceActivityDetector",
    "alaw_decode",
    "alaw_encode",
    "decode_audio",
    "encode_audio",
    "float32_to_int16",
    "frames",
    "input_format_from_wire",
    "input_format_to_wire",
    "int16_to_float32",
    "load_audio",
    "pcm16_from_bytes",
    "pcm16_to_bytes",
    "resample",
    "ulaw_decode",
    "ulaw_encode",
]
