import { afterEach, describe, expect, it, vi } from "vitest";
import { reactive } from "vue";
import { CAPTURE_DEFAULTS, openMic } from "../lib/mic";
import { ChatClient, emptyUi } from "../lib/client";

// Just enough of getUserMedia and Web Audio for openMic to run in jsdom.
function fakeMedia() {
  const track = { stop: vi.fn(), getSettings: () => ({ echoCancellation: false }) };
  const getUserMedia = vi.fn(async () => ({ getTracks: () => [track], getAudioTracks: () => [track] }));
  vi.stubGlobal("navigator", { mediaDevices: { getUserMedia } });
  vi.stubGlobal(
    "AudioContext",
    class {
      audioWorklet = { addModule: async () => undefined };
      createMediaStreamSource = () => ({ connect() {} });
      close = async () => undefined;
    },
  );
  vi.stubGlobal("AudioWorkletNode", class { port = { onmessage: null }; });
  return { getUserMedia, track };
}

describe("openMic", () => {
  afterEach(() => vi.unstubAllGlobals());

  it("asks the browser for exactly the processing given", async () => {
    const { getUserMedia, track } = fakeMedia();
    const mic = await openMic(() => {}, { echoCancellation: true, noiseSuppression: false, autoGainControl: false });
    expect(getUserMedia).toHaveBeenCalledWith({
      audio: { echoCancellation: true, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
    });
    expect(mic.track).toBe(track);
    mic.stop();
    expect(track.stop).toHaveBeenCalled();
  });

  it("is opened by the client with the settings as they are when the mic turns on", async () => {
    const { getUserMedia } = fakeMedia();
    let capture = { ...CAPTURE_DEFAULTS };
    const client = new ChatClient(reactive(emptyUi()), {
      location: { protocol: "http:", host: "x" },
      avatar: () => null,
      desired: () => ({}),
      capture: () => capture,
      WebSocketImpl: class { send() {} close() {} } as unknown as typeof WebSocket,
    });
    await client.startMic();
    client.stopMic();
    capture = { echoCancellation: false, noiseSuppression: true, autoGainControl: true };
    await client.startMic();
    const asked = getUserMedia.mock.calls.map((c) => (c as unknown as [{ audio: object }])[0].audio);
    expect(asked[0]).toMatchObject(CAPTURE_DEFAULTS);
    expect(asked[1]).toMatchObject(capture);
    expect(client.micSettings).toEqual({ echoCancellation: false });
  });
});
