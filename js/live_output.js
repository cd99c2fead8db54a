// turbostream.liveOutput: the live view on TurboStreamLiveOutput nodes, with fps and latency.
//
// The server pushes "turbostream.live.frame" messages to the client that owns the stream only;
// each names the LiveOutput node that made it, the capture time the browser stamped on the input
// frame (so latency is measured on one clock), and the frame as a JPEG data URL. Frames that arrive
// together (Live Input's frames_per_prompt > 1 sends a group per prompt) are shown spaced by their
// capture intervals, not all at once; at most PACED_MAX wait, the oldest give way.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { FRAME_EVENT } from "./live_channel.js";

const NODE_TYPE = "TurboStreamLiveOutput";
const FPS_FRAMES = 10; // fps over the last 10 arrivals
const LATENCY_WINDOW = 30;
const PACED_MAX = 8;
const PACED_GAP_MAX_MS = 250;
const OVERLAY_REFRESH_MS = 250; // re-laying out the text costs the tab more than showing a frame

class LiveView {
  constructor() {
    this.frames = 0;
    this.arrivals = [];
    this.latencies = [];
    this.streamIds = new Set();
    this.fps = 0;
    this.latencyMs = null;
    this.pending = [];
    this.timer = null;
    this.overlayAt = -Infinity;

    this.element = document.createElement("div");
    Object.assign(this.element.style, { position: "relative", width: "100%", height: "100%", background: "#111" });
    this.image = document.createElement("img");
    Object.assign(this.image.style, { width: "100%", height: "100%", objectFit: "contain", display: "block" });
    this.overlay = document.createElement("div");
    Object.assign(this.overlay.style, {
      position: "absolute",
      left: "4px",
      top: "4px",
      padding: "1px 6px",
      font: "12px monospace",
      color: "#fff",
      background: "rgba(0,0,0,0.6)",
      borderRadius: "3px",
    });
    this.overlay.textContent = "waiting for frames";
    this.element.append(this.image, this.overlay);
  }

  // Show now, or after the frames before it (spaced as they were captured).
  enqueue(detail) {
    this.pending.push(detail);
    if (this.pending.length > PACED_MAX) this.pending.splice(0, this.pending.length - PACED_MAX);
    if (this.timer === null) this.drain();
  }

  drain() {
    const detail = this.pending.shift();
    if (!detail) {
      this.timer = null;
      return;
    }
    this.show(detail);
    const next = this.pending[0];
    const gap = next ? Number(next.captured_ms) - Number(detail.captured_ms) : 0;
    this.timer = setTimeout(() => this.drain(), Number.isFinite(gap) ? Math.min(PACED_GAP_MAX_MS, Math.max(0, gap)) : 0);
  }

  show(detail) {
    const now = performance.now();
    this.frames += 1;
    this.streamIds.add(detail.stream_id);
    this.image.src = detail.image;
    this.arrivals.push(now);
    if (this.arrivals.length > FPS_FRAMES) this.arrivals.shift();
    const span = (this.arrivals.at(-1) - this.arrivals[0]) / 1000;
    this.fps = this.arrivals.length > 1 && span > 0 ? (this.arrivals.length - 1) / span : 0;
    if (typeof detail.captured_ms === "number") {
      this.latencies.push(Date.now() - detail.captured_ms);
      if (this.latencies.length > LATENCY_WINDOW) this.latencies.shift();
      const sorted = [...this.latencies].sort((a, b) => a - b);
      this.latencyMs = sorted[Math.floor(sorted.length / 2)];
    }
    if (now - this.overlayAt < OVERLAY_REFRESH_MS) return;
    this.overlayAt = now;
    const latency = this.latencyMs === null ? "–" : `${Math.round(this.latencyMs)} ms`;
    this.overlay.textContent = `${this.fps.toFixed(1)} fps · latency ${latency} · ${detail.width}x${detail.height}`;
  }
}

function findNode(id) {
  return app.graph?._nodes?.find((n) => String(n.id) === String(id));
}

app.registerExtension({
  name: "turbostream.liveOutput",

  async setup() {
    api.addEventListener(FRAME_EVENT, (event) => {
      const detail = event.detail ?? {};
      const node = findNode(detail.node);
      if (node?.turbostreamView && typeof detail.image === "string" && detail.image.startsWith("data:image/")) {
        node.turbostreamView.enqueue(detail);
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const view = new LiveView();
      this.turbostreamView = view;
      const widget = this.addDOMWidget("live_view", "turbostream_live_view", view.element, {
        serialize: false,
        hideOnZoom: false,
      });
      widget.serialize = false;
      widget.computeLayoutSize = () => ({ minHeight: 256, minWidth: 256 });
      this.setSize([Math.max(this.size[0], 320), Math.max(this.size[1], 400)]);
      return result;
    };
  },
});
