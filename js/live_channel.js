// turbostream.liveChannel: the live prompts' own websocket, and the tab's queue refreshes held to one
// a second while live.
//
// The host sends a prompt's execution events (execution_start, executing, progress, executed, ...)
// to the websocket client id the prompt was queued under. Under the tab's own id, the front end
// redraws the canvas and updates its stores for each of them: at one prompt per frame that was most
// of the tab's CPU (and so, on a small machine, the host's). Live Input queues its prompts under this
// channel's id instead, and the channel handles the few messages a live session needs:
// - execution_success / execution_interrupted end a prompt;
// - execution_error ends it and is handed on to the front end (its error dialog, the red node);
// - Live Output's frames are handed on to the front end's api listeners (the live view).
// The host also broadcasts "status" after every queue change, and the front end re-reads the queue and
// history for each; while a session is live, these are passed on at most every STATUS_COALESCE_MS
// (always the newest, and at once when the last session stops).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const FRAME_EVENT = "turbostream.live.frame"; // what Live Output pushes
const OPEN_TIMEOUT_MS = 10000;
const STATUS_COALESCE_MS = 1000;
const EARLY_MAX = 64;

function dispatchToFrontEnd(type, detail) {
  if (typeof api.dispatchCustomEvent === "function") api.dispatchCustomEvent(type, detail);
  else api.dispatchEvent(new CustomEvent(type, { detail }));
}

function socketUrl(clientId) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const host = api.api_host ?? location.host;
  const base = api.api_base ?? "";
  return `${scheme}://${host}${base}/ws?clientId=${encodeURIComponent(clientId)}`;
}

class LiveChannel {
  constructor() {
    this.clientId = null;
    this.socket = null;
    this.ready = null;
    this.prompts = new Map(); // prompt_id -> (type, detail) => void, for prompts queued here
    this.early = new Map(); // prompt_id -> [type, detail]: ended before POST /prompt's answer was read
    this.closeListeners = new Set();
    this.live = new Set(); // the live sessions running in this tab
    this.statusHold = { flush() {} };
  }

  setLive(session, running) {
    if (running) {
      this.live.add(session);
    } else if (this.live.delete(session) && !this.live.size) {
      this.statusHold.flush(); // the last one stopped: the newest queue state, now
    }
  }

  // Resolves once the host has registered this client id (its first "status" names it). Each
  // connection gets a new id: the host's clean-up of a closed socket could otherwise drop its successor.
  connect() {
    if (this.ready) return this.ready;
    const random = globalThis.crypto?.randomUUID?.() ?? Math.random().toString(36).slice(2);
    this.clientId = `turbostream-live-${random}`.slice(0, 64);
    const socket = new WebSocket(socketUrl(this.clientId));
    socket.binaryType = "arraybuffer"; // previews, if the host sends any: not wanted here
    this.socket = socket;
    this.ready = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        reject(new Error("the live connection to the server did not open"));
        socket.close();
      }, OPEN_TIMEOUT_MS);
      socket.addEventListener("message", (event) => {
        if (typeof event.data !== "string") return;
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch {
          return;
        }
        if (msg.type === "status" && msg.data?.sid) {
          clearTimeout(timer);
          resolve(this);
        } else {
          this.handle(msg.type, msg.data ?? {});
        }
      });
      socket.addEventListener("close", () => {
        clearTimeout(timer);
        reject(new Error("the live connection to the server closed"));
        if (this.socket !== socket) return;
        this.socket = null;
        this.ready = null;
        this.prompts.clear();
        for (const listener of this.closeListeners) listener();
      });
    });
    this.ready.catch(() => {});
    return this.ready;
  }

  // Call `done(type, detail)` when prompt `promptId` (queued under this.clientId) ends; `type` is
  // execution_success, execution_error or execution_interrupted.
  track(promptId, done) {
    const ended = this.early.get(promptId);
    if (ended) {
      this.early.delete(promptId);
      done(...ended);
    } else {
      this.prompts.set(promptId, done);
    }
  }

  handle(type, data) {
    if (type === FRAME_EVENT) {
      dispatchToFrontEnd(FRAME_EVENT, data);
      return;
    }
    if (type !== "execution_success" && type !== "execution_error" && type !== "execution_interrupted") return;
    const done = this.prompts.get(data.prompt_id);
    this.prompts.delete(data.prompt_id);
    if (type === "execution_error") dispatchToFrontEnd(type, data); // the front end shows it as for any prompt
    if (done) {
      done(type, data);
    } else {
      this.early.set(data.prompt_id, [type, data]);
      if (this.early.size > EARLY_MAX) this.early.delete(this.early.keys().next().value);
    }
  }
}

export const liveChannel = new LiveChannel();

// While `isLive()`, the front end's "status" listeners get the newest status at most every
// STATUS_COALESCE_MS; `flush()` hands on a held one at once.
function coalesceStatus(isLive) {
  const dispatch = typeof api.dispatchCustomEvent === "function" ? api.dispatchCustomEvent.bind(api) : null;
  if (!dispatch) return { flush() {} };
  let held = null;
  let timer = null;
  let last = -Infinity;
  const flush = () => {
    clearTimeout(timer);
    timer = null;
    if (!held) return;
    const detail = held.detail;
    held = null;
    last = performance.now();
    dispatch("status", detail);
  };
  api.dispatchCustomEvent = (type, detail) => {
    if (type !== "status" || !isLive()) return dispatch(type, detail);
    held = { detail };
    const wait = STATUS_COALESCE_MS - (performance.now() - last);
    if (wait <= 0) flush();
    else timer ??= setTimeout(flush, wait);
    return true;
  };
  return { flush };
}

app.registerExtension({
  name: "turbostream.liveChannel",

  async setup() {
    liveChannel.statusHold = coalesceStatus(() => liveChannel.live.size > 0);
  },
});
