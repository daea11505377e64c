import { afterEach, describe, expect, it } from "vitest";
import { mount } from "@vue/test-utils";
import Antd from "ant-design-vue";
import MicButton from "../components/MicButton.vue";
import ErrorBanner from "../components/ErrorBanner.vue";
import TranscriptList from "../components/TranscriptList.vue";
import { LOCALE_KEY, currentLocale, pickLocale, setLocale } from "../i18n";
import { checkUpload } from "../lib/api";
import { describeError } from "../lib/protocol";
import en from "../locales/en";
import zhCN from "../locales/zh-CN";

const global = { plugins: [Antd] };

function keys(o: object, prefix = ""): string[] {
  return Object.entries(o).flatMap(([k, v]) => (typeof v === "object" ? keys(v, `${prefix}${k}.`) : [`${prefix}${k}`]));
}

describe("i18n", () => {
  afterEach(() => {
    setLocale("en");
    localStorage.removeItem(LOCALE_KEY);
  });

  it("picks the browser's language unless one was chosen", () => {
    expect(pickLocale(null, ["zh-CN", "en-US"])).toBe("zh-CN");
    expect(pickLocale(null, ["zh-TW"])).toBe("zh-CN");
    expect(pickLocale(null, ["fr-FR", "en-GB", "zh-CN"])).toBe("en");
    expect(pickLocale(null, ["fr-FR"])).toBe("en");
    expect(pickLocale(null, [])).toBe("en");
    expect(pickLocale("en", ["zh-CN"])).toBe("en");
    expect(pickLocale("zh-CN", ["en-US"])).toBe("zh-CN");
    expect(pickLocale("klingon", ["zh-CN"])).toBe("zh-CN");
  });

  it("has every string in both languages, and no Chinese string left in English", () => {
    expect(keys(zhCN).sort()).toEqual(keys(en).sort());
    const flat = (o: object): string[] => Object.values(o).flatMap((v) => (typeof v === "object" ? flat(v) : [v as string]));
    expect(flat(zhCN).filter((s) => !/[\u4e00-\u9fff]/.test(s) && !/^(CPU %)$/.test(s))).toEqual([]);
  });

  it("switches the components' language at once and remembers the choice", async () => {
    expect(currentLocale()).toBe("en"); // jsdom's browser language is English
    const mic = mount(MicButton, { props: { state: "ready", micOn: false, level: 0 }, global });
    const banner = mount(ErrorBanner, { props: { error: describeError("llm_failed", "why") }, global });
    const list = mount(TranscriptList, { props: { messages: [], partial: "" } });
    expect(mic.text()).toContain("Talk");
    setLocale("zh-CN");
    await mic.vm.$nextTick();
    expect(mic.text()).toContain("说话");
    await mic.setProps({ state: "hearing", micOn: true });
    expect(mic.text()).toContain("听到你了");
    await banner.vm.$nextTick();
    expect(banner.text()).toContain("语言模型出错");
    expect(banner.find("[data-testid=retry]").text()).toBe("重新发送");
    expect(banner.text()).toContain("why"); // the server's message is kept
    await list.vm.$nextTick();
    expect(list.text()).toContain("打个招呼");
    expect(checkUpload("me", null)).toBe("请选择一张人像图片或一段视频。");
    expect(localStorage.getItem(LOCALE_KEY)).toBe("zh-CN");
    expect(document.documentElement.lang).toBe("zh-CN");
    setLocale("en");
    await mic.vm.$nextTick();
    expect(mic.text()).toContain("Hearing you");
  });
});
