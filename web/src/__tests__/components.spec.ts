import { describe, expect, it } from "vitest";
import { mount } from "@vue/test-utils";
import Antd from "ant-design-vue";
import MicButton from "../components/MicButton.vue";
import ErrorBanner from "../components/ErrorBanner.vue";
import TranscriptList from "../components/TranscriptList.vue";
import { describeError } from "../lib/protocol";

const global = { plugins: [Antd] };

describe("MicButton", () => {
  it("says Talk when off, and the conversation state when on", async () => {
    const w = mount(MicButton, { props: { state: "ready", micOn: false, level: 0 }, global });
    expect(w.text()).toContain("Talk");
    expect(w.find("[data-testid=level]").exists()).toBe(false);
    for (const [state, label] of [["listening", "Listening"], ["hearing", "Hearing you"], ["thinking", "Thinking"], ["speaking", "Speaking"]] as const) {
      await w.setProps({ state, micOn: true, level: 0.1 });
      expect(w.text()).toContain(label);
      expect(w.find("[data-mic-state]").attributes("data-mic-state")).toBe(state);
    }
  });
  it("shows the level and emits toggle", async () => {
    const w = mount(MicButton, { props: { state: "listening", micOn: true, level: 0.1 }, global });
    expect(w.find("[data-testid=level]").attributes("style")).toContain("width: 40%");
    await w.setProps({ level: 0.9 });
    expect(w.find("[data-testid=level]").attributes("style")).toContain("width: 100%");
    await w.find("button").trigger("click");
    expect(w.emitted("toggle")).toHaveLength(1);
  });
});

describe("ErrorBanner", () => {
  it("shows nothing without an error", () => {
    expect(mount(ErrorBanner, { props: { error: null }, global }).find("[data-testid=error]").exists()).toBe(false);
  });
  it("offers the retry that fits the error", async () => {
    const cases = [
      ["session_limit", "Retry now"],
      ["mic_denied", "Try the microphone again"],
      ["llm_failed", "Send again"],
    ] as const;
    for (const [code, label] of cases) {
      const w = mount(ErrorBanner, { props: { error: describeError(code, "why") }, global });
      expect(w.find("[data-testid=error]").attributes("data-code")).toBe(code);
      expect(w.text()).toContain("why");
      const retry = w.find("[data-testid=retry]");
      expect(retry.text()).toBe(label);
      await retry.trigger("click");
      expect(w.emitted("retry")).toHaveLength(1);
    }
    const w = mount(ErrorBanner, { props: { error: describeError("asr_failed", "x") }, global });
    expect(w.find("[data-testid=retry]").exists()).toBe(false);
    await w.find("[data-testid=dismiss]").trigger("click");
    expect(w.emitted("dismiss")).toHaveLength(1);
  });
});

describe("TranscriptList", () => {
  it("renders both sides, cut replies and the partial transcript", () => {
    const w = mount(TranscriptList, {
      props: {
        messages: [
          { id: 1, role: "user", text: "hi" },
          { id: 2, role: "bot", text: "hello there", stopped: true },
          { id: 3, role: "note", text: "offline" },
        ],
        partial: "what is",
      },
    });
    const items = w.findAll("li");
    expect(items.map((li) => li.attributes("data-role"))).toEqual(["user", "bot", "note", undefined]);
    expect(items[1].classes()).toContain("stopped");
    expect(w.find("[data-testid=partial]").text()).toBe("what is…");
  });
  it("invites the person to start when empty", () => {
    expect(mount(TranscriptList, { props: { messages: [], partial: "" } }).text()).toContain("Say hello");
  });
});
