// Microphone capture: any input rate -> pcm16 mono 24 kHz, posted in 20 ms frames (480 samples)
// with the frame's RMS level. Linear interpolation; state carries over between blocks.
const OUT_RATE = 24000;
const FRAME = 480;

class Pcm16Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample
    this.t = 0; // read position in [prev, ...block]
    this.prev = 0;
    this.frame = new Int16Array(FRAME);
    this.n = 0;
    this.energy = 0;
  }

  process(inputs) {
    const block = inputs[0] && inputs[0][0];
    if (!block) return true;
    const len = block.length;
    let t = this.t;
    while (t < len) {
      const i = Math.floor(t);
      const a = i === 0 ? this.prev : block[i - 1];
      const b = block[i];
      const x = Math.max(-1, Math.min(1, a + (b - a) * (t - i)));
      this.frame[this.n++] = x < 0 ? x * 0x8000 : x * 0x7fff;
      this.energy += x * x;
      if (this.n === FRAME) {
        const pcm = this.frame.buffer;
        this.port.postMessage({ pcm, rms: Math.sqrt(this.energy / FRAME) }, [pcm]);
        this.frame = new Int16Array(FRAME);
        this.n = 0;
        this.energy = 0;
      }
      t += this.step;
    }
    this.t = t - len;
    this.prev = block[len - 1];
    return true;
  }
}

registerProcessor("pcm16-capture", Pcm16Capture);
