// turbostream.liveInput: Start/Stop live capture on TurboStreamLiveInput nodes.
//
// While live, frames from the webcam (getUserMedia) or a local video file are drawn to a canvas at
// the node's width x height, uploaded to /turbostream/live/<stream_id>/frame with the source's
// token, and the workflow is queued once per `frames_per_prompt` frames (a group: uploaded first, then
// its prompt queued; Live Input takes the newest whole group). At most `max_in_flight` prompts are
// queued at a time; a frame that comes while all slots are busy is dropped before it is drawn or
// encoded (never an unbounded queue). The prompts are queued under the live channel's websocket
// client id (js/live_channel.js), not the tab's: their execution events do not reach the front end.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { liveChannel } from "./live_channel.js";

const NODE_TYPE = "TurboStreamLiveInput";
const TOKEN_HEADER = "X-TurboStream-Token";
const CAPTURED_HEADER = "X-TurboStream-Captured";
const PROMPT_TIMEOUT_MS = 60000;
const JPEG_QUALITY = 0.85;
const SOURCES = ["webcam", "video file"];
const TIMING_WINDOW = 100;
const PROMPT_REFRESH_MS = 250;
const STATUS_REFRESH_MS = 500;
const FORGET_EVERY_MS = 1000;

function widgetOf(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function valueOf(node, name, fallback) {
  const w = widgetOf(node, name);
  return w === undefined || w.value === undefined ? fallback : w.value;
}

class LiveSession {
  constructor(node) {
    this.node = node;
    this.running = false;
    this.inFlight = new Map(); // prompt_id -> time queued
    this.reserved = 0; // slots taken by groups still being uploaded/queued
    this.group = null; // the group being uploaded: { frames: uploaded so far, size, busy: an upload running }
    this.stats = { captured: 0, dropped: 0, queued: 0, done: 0, errors: 0, started: 0 };
    this.timings = {};
    this.statusWidget = null;
    this.message = "stopped";
  }

  get message() {
    return this._message;
  }

  // Shown in the node's status line; also what a failed start reports in a toast.
  set message(text) {
    this._message = text;
    if (this.statusWidget) this.statusWidget.value = text;
    this.onStateChange?.();
  }

  get busy() {
    return this.inFlight.size + this.reserved;
  }

  async start(source, file) {
    if (this.running) return;
    this.stats = { captured: 0, dropped: 0, queued: 0, done: 0, errors: 0, started: performance.now() };
    this.message = "starting…";
    try {
      await this.openMedia(source, file);
      await this.openSource();
    } catch (err) {
      this.closeMedia();
      this.message = `error: ${err.message ?? err}`;
      throw err;
    }
    this.running = true;
    liveChannel.setLive(this, true);
    this.width = valueOf(this.node, "width", 512);
    this.height = valueOf(this.node, "height", 512);
    this.maxInFlight = valueOf(this.node, "max_in_flight", 2);
    this.group = null;
    this.canvas = document.createElement("canvas");
    this.canvas.width = this.width;
    this.canvas.height = this.height;
    const fps = Math.max(1, valueOf(this.node, "fps", 10));
    this.interval = 1000 / fps;
    this.lastCapture = -Infinity;
    this.prompt = null;
    this.timer = setInterval(() => this.tick(), this.interval);
    this.message = `live: ${this.streamId}`;
  }

  async openMedia(source, file) {
    const video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    if (source === "video file") {
      if (!file) throw new Error("choose a video file first");
      this.objectUrl = URL.createObjectURL(file);
      video.src = this.objectUrl;
      video.loop = true;
    } else {
      if (!navigator.mediaDevices?.getUserMedia) {
        throw new Error("this browser gives no camera here (needs https or localhost)");
      }
      this.mediaStream = await navigator.mediaDevices.getUserMedia({
        video: { width: valueOf(this.node, "width", 512), height: valueOf(this.node, "height", 512) },
        audio: false,
      });
      video.srcObject = this.mediaStream;
    }
    await video.play();
    this.video = video;
  }

  closeMedia() {
    this.mediaStream?.getTracks().forEach((t) => t.stop());
    this.mediaStream = null;
    if (this.video) {
      this.video.pause();
      this.video.removeAttribute("src");
      this.video.srcObject = null;
    }
    this.video = null;
    if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
    this.objectUrl = null;
  }

  // Claim the stream id for this tab; another tab holding it makes us pick a suffixed id.
  async openSource() {
    await liveChannel.connect();
    const idWidget = widgetOf(this.node, "stream_id");
    const base = String(idWidget?.value || "webcam");
    let id = base;
    for (let attempt = 0; attempt < 4; attempt++) {
      const res = await api.fetchApi(`/turbostream/live/${encodeURIComponent(id)}/open`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ client_id: liveChannel.clientId, frames_per_prompt: valueOf(this.node, "frames_per_prompt", 1) }),
      });
      const body = await res.json().catch(() => ({}));
      if (res.status === 409) {
        id = `${base.replace(/-[a-z0-9]{4}$/, "")}-${Math.random().toString(36).slice(2, 6)}`;
        continue;
      }
      if (!res.ok) throw new Error(body.error ?? `open failed (${res.status})`);
      if (idWidget) idWidget.value = id;
      this.streamId = id;
      this.token = body.token;
      // read-only view of this stream's output (OBS "Browser Source", a second screen): its own token
      this.viewUrl = body.view_url ? new URL(api.apiURL(body.view_url), location.href).href : null;
      return;
    }
    throw new Error(`stream id ${base} and its variants are all in use`);
  }

  async stop(reason = "stopped") {
    if (!this.running && !this.video) return;
    this.running = false;
    clearInterval(this.timer);
    if (this.group && !this.group.busy) {
      this.group = null; // a group waiting for its next frame: its slot is free again
      this.reserved -= 1;
    }
    this.closeMedia();
    this.forgetNow();
    this.message = reason;
    liveChannel.setLive(this, false);
    this.viewUrl = null; // closing the stream ends its views
    if (this.token) {
      const token = this.token;
      this.token = null;
      await api
        .fetchApi(`/turbostream/live/${encodeURIComponent(this.streamId)}/close`, {
          method: "POST",
          headers: { [TOKEN_HEADER]: token },
        })
        .catch(() => {});
    }
    this.node.setDirtyCanvas(true, false);
  }

  // Where a frame's time goes in the browser (ms, the last TIMING_WINDOW frames): capture (draw +
  // JPEG encode), upload, queue (graph to prompt + POST /prompt), idle (a slot free, no frame taken yet).
  record(sample) {
    for (const [key, ms] of Object.entries(sample)) {
      if (ms === null) continue;
      const list = (this.timings[key] ??= []);
      list.push(ms);
      if (list.length > TIMING_WINDOW) list.shift();
    }
  }

  // Prompt `promptId` ended: `type` is the live channel's execution_success, _error or _interrupted.
  finish(promptId, type) {
    if (!this.inFlight.delete(promptId)) return;
    const failed = type !== "execution_success";
    this.freedAt ??= performance.now();
    if (!failed) this.refill();
    this.stats.done += 1;
    if (failed) {
      this.stats.errors += 1;
      if (this.running) {
        const interrupted = type === "execution_interrupted";
        this.stop(interrupted ? "stopped: the prompt was interrupted" : "stopped: the workflow failed (see the error)");
      }
    } else {
      this.forget(promptId);
    }
  }

  // A finished frame's history entry goes: the front end re-reads the history after queue changes,
  // so thousands of live frames would make each re-read heavier and push the user's own results out
  // of the history. Failed frames stay, with their error. One request per FORGET_EVERY_MS.
  forget(promptId) {
    (this.forgotten ??= []).push(promptId);
    this.forgetTimer ??= setTimeout(() => this.forgetNow(), FORGET_EVERY_MS);
  }

  forgetNow() {
    clearTimeout(this.forgetTimer);
    this.forgetTimer = null;
    const ids = this.forgotten ?? [];
    this.forgotten = [];
    if (!ids.length) return;
    api
      .fetchApi("/history", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ delete: ids }),
      })
      .catch(() => {});
  }

  // A slot came free: take the next frame now rather than at the next timer tick, unless that would
  // exceed the node's fps (the timer then takes it).
  refill() {
    if (this.running && performance.now() - this.lastCapture >= this.interval * 0.9) this.tick();
  }

  async tick() {
    if (!this.running || !this.video || this.video.readyState < 2) return;
    const now = performance.now();
    if (now - this.lastCapture < this.interval * 0.5) return; // just taken by refill()
    for (const [id, t] of this.inFlight) {
      if (now - t > PROMPT_TIMEOUT_MS) this.inFlight.delete(id); // lost track of it: free the slot
    }
    // a frame joins the open group, or opens one in a free slot; else it is dropped before any work
    if (this.group ? this.group.busy : this.busy >= this.maxInFlight) {
      this.stats.dropped += 1;
      return;
    }
    if (!this.group) {
      // the widget's value now: a change while live applies from the next group (and prompt)
      this.group = { frames: 0, size: Math.max(1, valueOf(this.node, "frames_per_prompt", 1)), busy: false };
      this.reserved += 1;
    }
    const group = this.group;
    group.busy = true;
    this.lastCapture = now;
    const t0 = performance.now();
    let slotHeld = true;
    try {
      const blob = await this.capture();
      const t1 = performance.now();
      if (!this.running) {
        if (this.group === group) this.group = null;
        return;
      }
      const res = await api.fetchApi(`/turbostream/live/${encodeURIComponent(this.streamId)}/frame`, {
        method: "POST",
        headers: { "Content-Type": "image/jpeg", [TOKEN_HEADER]: this.token, [CAPTURED_HEADER]: String(Date.now()) },
        body: blob,
      });
      if (!res.ok) {
        const body = await res.json().catch(() => ({}));
        throw new Error(body.error ?? `frame upload failed (${res.status})`);
      }
      this.stats.captured += 1;
      const t2 = performance.now();
      group.frames += 1;
      group.busy = false;
      if (!this.running) {
        if (this.group === group) this.group = null;
        return;
      }
      if (group.frames < group.size) {
        slotHeld = false; // the group stays open (and its slot reserved) for the next frame
        this.record({ capture: t1 - t0, upload: t2 - t1 });
        return;
      }
      this.group = null; // complete: the next frame may open a group while this one is queued
      const promptId = await this.queue();
      const t3 = performance.now();
      this.inFlight.set(promptId, t3);
      liveChannel.track(promptId, (type) => this.finish(promptId, type));
      this.record({ capture: t1 - t0, upload: t2 - t1, queue: t3 - t2, idle: this.freedAt ? t0 - this.freedAt : null });
      this.freedAt = null;
      this.stats.queued += 1;
      if (this.running && t3 - (this.shownAt ?? 0) > STATUS_REFRESH_MS) {
        // the status line redraws the canvas: at most twice a second, not per frame (and not over
        // the reason of a stop that came while this prompt was being queued)
        this.shownAt = t3;
        this.message = `live: ${this.streamId} · ${this.stats.queued} queued · ${this.stats.dropped} dropped`;
      }
    } catch (err) {
      const detail = err?.response?.error?.message ?? err?.message ?? String(err);
      console.error("[TurboStream] live frame failed:", err);
      if (this.group === group) this.group = null;
      await this.stop(`stopped: ${detail}`);
    } finally {
      if (slotHeld) this.reserved -= 1;
    }
  }

  // Queue the workflow (rebuilt from the graph at most every PROMPT_REFRESH_MS: widget changes apply
  // within that; the prompt itself does not change per frame, Live Input reads the newest frame). Only the API prompt is
  // sent: not the UI workflow the host would store as extra_pnginfo with every frame's history entry,
  // and not through api.queuePrompt, whose front-end bookkeeping runs for every prompt.
  async queue() {
    const now = performance.now();
    if (!this.prompt || now - this.promptAt > PROMPT_REFRESH_MS) {
      this.prompt = (await app.graphToPrompt()).output;
      this.promptAt = now;
    }
    const output = this.prompt;
    const res = await api.fetchApi("/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: output, client_id: liveChannel.clientId }),
    });
    const body = await res.json().catch(() => ({}));
    if (!res.ok) {
      const err = new Error(body.error?.message ?? `queueing failed (${res.status})`);
      err.response = body;
      throw err;
    }
    return body.prompt_id;
  }

  // The video frame scaled to cover width x height and centre-cropped, as JPEG.
  capture() {
    const { videoWidth: vw, videoHeight: vh } = this.video;
    const scale = Math.max(this.width / vw, this.height / vh);
    const sw = this.width / scale;
    const sh = this.height / scale;
    const ctx = this.canvas.getContext("2d");
    ctx.drawImage(this.video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, this.width, this.height);
    return new Promise((resolve, reject) =>
      this.canvas.toBlob((b) => (b ? resolve(b) : reject(new Error("canvas capture failed"))), "image/jpeg", JPEG_QUALITY),
    );
  }
}

const sessions = new Set();

app.registerExtension({
  name: "turbostream.liveInput",

  async setup() {
    liveChannel.closeListeners.add(() => {
      for (const s of sessions) {
        s.inFlight.clear(); // their end events went with the connection
        if (s.running) s.stop("stopped: lost the live connection to the server");
      }
    });
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const session = new LiveSession(this);
      this.turbostreamLive = session;
      sessions.add(session);

      const source = this.addWidget("combo", "source", SOURCES[0], () => {}, { values: SOURCES, serialize: false });
      source.serialize = false;

      const picker = document.createElement("input");
      picker.type = "file";
      picker.accept = "video/*";
      const fileButton = this.addWidget("button", "choose video file", null, () => picker.click(), { serialize: false });
      fileButton.serialize = false;
      picker.addEventListener("change", () => {
        session.file = picker.files?.[0] ?? null;
        fileButton.label = session.file ? `video: ${session.file.name}` : "choose video file";
        if (session.file) source.value = "video file";
        this.setDirtyCanvas(true, false);
      });

      const toggle = this.addWidget(
        "button",
        "start",
        null,
        async () => {
          if (session.running) {
            await session.stop();
          } else {
            await session.start(source.value, session.file).catch((err) => {
              console.error("[TurboStream] live start failed:", err);
              app.extensionManager?.toast?.add?.({
                severity: "error",
                summary: "TurboStream live",
                detail: session.message,
                life: 6000,
              });
            });
          }
          toggle.label = session.running ? "■ Stop live" : "▶ Start live";
          this.setDirtyCanvas(true, false);
        },
        { serialize: false },
      );
      toggle.label = "▶ Start live";
      toggle.serialize = false;

      const view = this.addWidget(
        "button",
        "view",
        null,
        () => {
          if (session.viewUrl) window.open(session.viewUrl, "_blank", "noopener");
        },
        { serialize: false },
      );
      view.label = "⧉ Open view (OBS)";
      view.serialize = false;

      const status = this.addWidget("text", "status", "stopped", () => {}, { serialize: false });
      status.serialize = false;
      session.statusWidget = status;
      session.onStateChange = () => {
        toggle.label = session.running ? "■ Stop live" : "▶ Start live";
        this.setDirtyCanvas(true, false);
      };
      return result;
    };

    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      const session = this.turbostreamLive;
      if (session) {
        session.stop("node removed");
        sessions.delete(session);
      }
      return onRemoved?.apply(this, arguments);
    };
  },
});
