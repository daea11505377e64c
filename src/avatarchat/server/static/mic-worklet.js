// AudioWorklet: microphone samples at the context's rate → 16 kHz mono PCM16 frames of 20 ms.
// Resampling is linear interpolation after a one-pole low-pass (enough for speech recognition).
class MicProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / 16000;
    this.pos = 0; // fractional read position into the current input block
    this.prev = 0;
    this.lp = 0;
    this.alpha = Math.min(1, (2 * Math.PI * 7000) / sampleRate);
    this.out = new Int16Array(320);
    this.n = 0;
  }

  process(inputs) {
    const input = inputs[0];
    if (!input || !input.length) return true;
    const ch = input[0];
    let level = 0;
    for (let i = 0; i < ch.length; i++) {
      this.lp += this.alpha * (ch[i] - this.lp);
      const x = this.lp;
      level = Math.max(level, Math.abs(x));
      // Emit every output sample whose time falls between the previous and this input sample.
      while (this.pos <= i) {
        const frac = this.pos - (i - 1);
        const v = this.prev + (x - this.prev) * Math.max(0, Math.min(1, frac));
        this.out[this.n++] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
        if (this.n === this.out.length) {
          this.port.postMessage({ pcm: this.out.buffer, level }, [this.out.buffer]);
          this.out = new Int16Array(320);
          this.n = 0;
        }
        this.pos += this.step;
      }
      this.prev = x;
    }
    this.pos -= ch.length;
    return true;
  }
}

registerProcessor("mic-processor", MicProcessor);
