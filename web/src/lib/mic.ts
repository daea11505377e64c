// Microphone capture: getUserMedia → AudioWorklet (/static/mic-worklet.js, shared with the plain page)
// → 20 ms frames of 16 kHz mono PCM16, plus a peak level for the meter.

export interface MicHandle {
  /** The captured track (its getSettings() tells what the browser applied). */
  track: MediaStreamTrack | null;
  stop(): void;
}

export class MicDeniedError extends Error {}

/** The browser's own processing of the captured audio (the person's settings). */
export interface CaptureOptions {
  echoCancellation: boolean;
  noiseSuppression: boolean;
  autoGainControl: boolean;
}

// By bench/bench_voice_page.py (page WER / direct WER, 24 utterances, 2 runs): echo cancellation with auto gain was
// the best (1.17x clean, 1.03x at 20 dB SNR), all on 1.67x, EC alone 2.0x; noise suppression helped nowhere. EC stays
// on so that the avatar's own voice from the speakers does not barge in.
export const CAPTURE_DEFAULTS: CaptureOptions = { echoCancellation: true, noiseSuppression: false, autoGainControl: true };

export async function openMic(onFrame: (pcm: ArrayBuffer, level: number) => void, capture: CaptureOptions): Promise<MicHandle> {
  let stream: MediaStream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        echoCancellation: capture.echoCancellation,
        noiseSuppression: capture.noiseSuppression,
        autoGainControl: capture.autoGainControl,
        channelCount: 1,
      },
    });
  } catch (err) {
    const e = err as DOMException;
    const why = e.name === "NotAllowedError" ? "access was denied" : e.name === "NotFoundError" ? "no microphone was found" : e.message;
    throw new MicDeniedError(`The microphone is unavailable: ${why}. Allow it for this site in the browser, then try again.`);
  }
  const ctx = new AudioContext();
  await ctx.audioWorklet.addModule("/static/mic-worklet.js");
  const source = ctx.createMediaStreamSource(stream);
  const node = new AudioWorkletNode(ctx, "mic-processor");
  node.port.onmessage = (ev: MessageEvent<{ pcm: ArrayBuffer; level: number }>) => onFrame(ev.data.pcm, ev.data.level);
  source.connect(node);
  return {
    track: stream.getAudioTracks()[0] ?? null,
    stop() {
      node.port.onmessage = null;
      stream.getTracks().forEach((track) => track.stop());
      void ctx.close();
    },
  };
}
