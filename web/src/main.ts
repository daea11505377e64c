import { createApp } from "vue";
import { createPinia } from "pinia";
import "ant-design-vue/dist/reset.css";
import App from "./App.vue";
import { router } from "./router";

// Ant Design Vue's components are imported where they are used (tree-shaken, their CSS-in-JS with them), not
// installed whole: the chat view loads only what it renders (BENCHMARKS.md, "Web app bundle").
createApp(App).use(createPinia()).use(router).mount("#app");
