import { createRouter, createWebHashHistory } from "vue-router";
import ChatView from "./views/ChatView.vue";

// Hash history: the Python app serves one index.html at "/", with no server-side routes to add.
export const router = createRouter({
  history: createWebHashHistory(),
  routes: [
    { path: "/", name: "chat", component: ChatView },
    { path: "/avatars", name: "avatars", component: () => import("./views/AvatarsView.vue") },
    { path: "/monitor", name: "monitor", component: () => import("./views/MonitorView.vue") },
  ],
});
